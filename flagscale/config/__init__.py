"""Typed run configuration: dataclasses, model presets, YAML loading and validation."""

from flagscale.config.loader import (all_keys, config_to_dict, data_prefixes, dump_config,
                                     key_docs, load_config, padded_vocab_size, validate,
                                     world_size_of)
from flagscale.config.presets import MODEL_PRESETS, default_seq_length
from flagscale.config.schema import (CheckpointConfig, Config, DataConfig, Layout, MetricsConfig,
                                     ModelConfig, ParallelConfig, RunConfig, TrainConfig)

__all__ = ["Config", "ModelConfig", "ParallelConfig", "TrainConfig", "DataConfig",
           "CheckpointConfig", "MetricsConfig", "RunConfig", "Layout", "MODEL_PRESETS",
           "load_config", "validate", "dump_config", "config_to_dict", "data_prefixes",
           "padded_vocab_size", "all_keys", "key_docs", "world_size_of", "default_seq_length"]
