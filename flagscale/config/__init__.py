"""Typed run configuration: dataclasses, model presets, parallel degrees, YAML loading and
validation. Importing it does not import torch."""

from flagscale.config.loader import (CHOICES, all_keys, config_to_dict, data_prefixes,
                                     dump_config, key_docs, load_config, padded_vocab_size,
                                     parallel_dims, pipeline_split, split_fractions,
                                     transformer_engine_features, validate, world_size_of)
from flagscale.config.parallel_dims import ParallelDims
from flagscale.config.presets import MODEL_PRESETS, default_seq_length
from flagscale.config.schema import (CheckpointConfig, Config, DataConfig, Layout, MetricsConfig,
                                     ModelConfig, ParallelConfig, RunConfig, TrainConfig)

__all__ = ["Config", "ModelConfig", "ParallelConfig", "TrainConfig", "DataConfig",
           "CheckpointConfig", "MetricsConfig", "RunConfig", "Layout", "ParallelDims",
           "MODEL_PRESETS", "load_config", "validate", "dump_config", "config_to_dict",
           "CHOICES", "data_prefixes", "padded_vocab_size", "parallel_dims", "split_fractions", "all_keys",
           "key_docs", "world_size_of", "default_seq_length", "pipeline_split",
           "transformer_engine_features"]
