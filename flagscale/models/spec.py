"""What a model family is, and the registry of families.

    spec = get_model_spec(cfg.model)          # from model.family
    spec.transformer_config(cfg, layout, platform)
    spec.hf_mapping(cfg.model)                # [Vocab(...), Direct(...), QKV(...), ...]

Every family flagscale trains is a dense pre-norm decoder that megatron-core builds as a
``GPTModel``: RMSNorm, grouped-query attention with rotate-half RoPE, a SwiGLU MLP, no linear biases
except (where the family has them) on the query/key/value projections, and an output layer that may
share the embedding matrix. :class:`ModelSpec` implements that decoder once: the translation into
megatron-core's ``TransformerConfig``, the layer spec, the role of each parameter for
initialisation, parameter and matrix-multiply counts, the architecture keys a checkpoint must
match, and the Hugging Face ``config.json`` fields the families share. A family module
(``llama.py``, ``mistral.py``, ``qwen2.py``) subclasses it with its Hugging Face names, what it
allows (q/k/v biases, tied embeddings), what it refuses, and its declarative weight mapping, and
registers one instance with :func:`register`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from flagscale.config import Config, Layout, ModelConfig
from flagscale.errors import ConfigError, ConversionError

if TYPE_CHECKING:  # torch (through the platform) is imported only where a model is built
    from flagscale.platform import Platform

# What megatron-core 0.16.1 RotaryEmbedding._apply_scaling hard-codes: only the llama3 scaling
# factor is configurable, the low/high frequency factors and the original context are fixed.
MCORE_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}
HF_REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "vocab_size")


@dataclass(frozen=True)
class ModelDims:
    """The sizes shape checks, the weight mapping and the counts are written in."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    """True vocabulary size (Hugging Face side, unpadded)."""
    padded_vocab_size: Optional[int] = None
    """Rows of megatron-core's embedding and output layer; ``None`` means unpadded."""

    @classmethod
    def of(cls, model: ModelConfig, padded_vocab_size: Optional[int] = None) -> "ModelDims":
        """From a flagscale ``ModelConfig``."""
        return cls(model.num_layers, model.hidden_size, model.num_attention_heads,
                   model.num_query_groups or model.num_attention_heads, model.ffn_hidden_size,
                   model.vocab_size, padded_vocab_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def q_width(self) -> int:
        """Width of all query heads together: heads * head_dim."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Width of all key (or value) heads together: query groups * head_dim."""
        return self.num_query_groups * self.head_dim

    @property
    def vocab_rows(self) -> int:
        """Rows megatron-core stores for the vocabulary (padded when known)."""
        return self.padded_vocab_size or self.vocab_size


class ModelSpec:
    """A dense RMSNorm/SwiGLU/RoPE decoder built as megatron-core's ``GPTModel`` (see the module
    docstring). Subclasses set the class attributes and :meth:`hf_mapping`."""

    name: str = ""
    """``model.family`` value."""
    hf_architectures: tuple[str, ...] = ()
    """Hugging Face ``architectures`` read as this family; the first is the one exports write."""
    hf_model_types: tuple[str, ...] = ()
    """Hugging Face ``model_type`` values of those architectures; the first is written."""
    qkv_bias: bool = False
    """Whether the family's query/key/value projections carry a bias (it must match)."""
    tied_embeddings: bool = False
    """Whether the family may share the embedding with the output layer."""

    # -- configuration -------------------------------------------------------------------------

    def check(self, model: ModelConfig) -> None:
        """Refuse options the family's Hugging Face architecture cannot express (ConfigError)."""
        arch = self.hf_architectures[0]
        if model.qkv_bias != self.qkv_bias:
            has = "always has" if self.qkv_bias else "has no"
            raise ConfigError(f"model.qkv_bias={model.qkv_bias} does not fit model.family="
                              f"{self.name}: {arch} {has} query/key/value biases. Set "
                              f"model.qkv_bias={self.qkv_bias}"
                              + ("" if self.qkv_bias else " or use model.family=qwen2") + ".")
        if model.tie_word_embeddings and not self.tied_embeddings:
            raise ConfigError(f"model.tie_word_embeddings=true is not supported for model.family="
                              f"{self.name} ({arch} exports with a separate lm_head). Set it "
                              f"false or use model.family=qwen2.")

    def architecture_keys(self) -> tuple[str, ...]:
        """``ModelConfig`` fields two checkpoints must agree on to be the same network."""
        return ("family", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "vocab_size", "qkv_bias", "tie_word_embeddings")

    # -- megatron-core -------------------------------------------------------------------------

    def transformer_config(self, cfg: Config, layout: Layout, platform: Platform):
        """Translate the flagscale config into megatron-core's ``TransformerConfig``."""
        from megatron.core.transformer import TransformerConfig

        return TransformerConfig(**self.transformer_config_kwargs(cfg, layout, platform))

    def transformer_config_kwargs(self, cfg: Config, layout: Layout,
                                  platform: Platform) -> dict[str, Any]:
        """The arguments of :meth:`transformer_config`: the architecture, the layout, and the
        performance settings Megatron-LM trains dense Llama models with on GPUs, each fused kernel
        only where ``platform`` really has it (on cpu none, so CPU runs stay exact)."""
        import torch
        import torch.nn.functional as F

        m, p = cfg.model, cfg.parallel
        bf16 = m.params_dtype == "bf16"
        dtype = torch.bfloat16 if bf16 else torch.float32
        cuda = platform.kind == "cuda"
        te = platform.transformer_engine
        # Megatron-LM (arguments.py) overlaps pipeline p2p with compute in the interleaved
        # schedule, which requires unbatched p2p.
        overlap_p2p = bool(layout.vpp) and (cuda if p.overlap_p2p_comm is None
                                            else p.overlap_p2p_comm)
        return dict(
            num_layers=m.num_layers,
            hidden_size=m.hidden_size,
            num_attention_heads=m.num_attention_heads,
            num_query_groups=layout.num_query_groups,
            ffn_hidden_size=m.ffn_hidden_size,
            kv_channels=layout.kv_channels,
            normalization="RMSNorm",
            layernorm_epsilon=m.norm_epsilon,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=m.qkv_bias,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=m.init_method_std,
            # init_weights redraws every weight so it does not depend on the layout; megatron-core's
            # own pass stays on because it is also what marks parameters as tensor-parallel
            # (without those marks the grad norm ignores the shards of TP ranks > 0).
            perform_initialization=True,
            tensor_model_parallel_size=p.tp,
            pipeline_model_parallel_size=p.pp,
            virtual_pipeline_model_parallel_size=layout.vpp,
            context_parallel_size=layout.cp,
            cp_comm_type=p.cp_comm_type if layout.cp > 1 else None,
            sequence_parallel=p.sequence_parallel,
            num_layers_in_first_pipeline_stage=p.num_layers_in_first_pipeline_stage,
            num_layers_in_last_pipeline_stage=p.num_layers_in_last_pipeline_stage,
            account_for_embedding_in_pipeline_split=p.account_for_embedding_in_pipeline_split,
            account_for_loss_in_pipeline_split=p.account_for_loss_in_pipeline_split,
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=bf16,
            fp8=m.fp8,
            fp8_recipe=m.fp8_recipe,
            # The loss is a token mean over the whole global batch, whatever the microbatch split.
            calculate_per_token_loss=True,
            # megatron-core's own jit-fused SwiGLU: no library beyond torch, but a different
            # rounding than the unfused ops, so GPU only.
            bias_activation_fusion=cuda,
            masked_softmax_fusion=False,
            persist_layer_norm=cuda,
            # megatron-core's fused RoPE is Transformer Engine's kernel.
            apply_rope_fusion=cuda and te,
            cross_entropy_loss_fusion=cuda,
            cross_entropy_fusion_impl="te" if te else "native",
            # The output layer is megatron-core's own ColumnParallelLinear even under the TE spec,
            # and it needs apex's fused_weight_gradient_mlp_cuda for this fusion.
            gradient_accumulation_fusion=cuda and platform.fused_wgrad,
            tp_comm_overlap=p.tp_comm_overlap,
            deallocate_pipeline_outputs=True,
            # gloo matches messages between two ranks by posting order only. Batched p2p posts a
            # forward activation and a backward gradient of equal shape to the same peer (pp=2:
            # previous == next stage) in an order the receiver does not mirror, silently swapping
            # them under the interleaved schedule; megatron's ordered even/odd p2p path does not.
            batch_p2p_comm=cuda and not overlap_p2p,
            # The device-wide sync after each batched p2p works around a torch < 1.13 bug.
            batch_p2p_sync=False,
            overlap_p2p_comm=overlap_p2p,
            **self._recompute_kwargs(cfg),
        )

    @staticmethod
    def _recompute_kwargs(cfg: Config) -> dict[str, Any]:
        """megatron-core's recomputation arguments for ``train.recompute*``."""
        t = cfg.train
        if t.recompute == "selective":
            return dict(recompute_granularity="selective",
                        recompute_modules=list(t.recompute_modules or ["core_attn"]))
        if t.recompute == "full":
            # block without a count recomputes every layer of the stage (megatron-core caps it).
            default = 1 if t.recompute_method == "uniform" else cfg.model.num_layers
            return dict(recompute_granularity="full", recompute_method=t.recompute_method,
                        recompute_num_layers=t.recompute_num_layers or default)
        return {}

    def layer_spec(self, platform: Platform, tconfig, vp_stage: Optional[int]):
        """Transformer Engine spec when TE imports, megatron-core's local spec otherwise, with
        torch's fused attention on GPUs (on cpu megatron-core's own attention keeps CPU runs
        bit-exact against earlier results; the two agree to rounding, see the parity test)."""
        from flagscale.models.layers import local_layer_spec

        if platform.transformer_engine:
            from megatron.core.models.gpt import gpt_layer_specs

            return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
        return local_layer_spec(tconfig, vp_stage, fused_attention=platform.kind == "cuda")

    def gpt_model_kwargs(self, cfg: Config) -> dict[str, Any]:
        """``GPTModel`` arguments beyond the config: embeddings, position embedding, RoPE."""
        m = cfg.model
        return dict(share_embeddings_and_output_weights=m.tie_word_embeddings,
                    position_embedding_type="rope", rotary_base=int(m.rope_theta),
                    rope_scaling=m.rope_scaling_factor is not None,
                    rope_scaling_factor=m.rope_scaling_factor or 8.0)

    # -- initialisation ------------------------------------------------------------------------

    def param_role(self, name: str) -> str:
        """Role of parameter ``name`` for initialisation: ``norm`` (ones), ``bias`` (zeros),
        ``residual`` (a projection back into the residual stream: Megatron's scaled init) or
        ``weight`` (normal)."""
        if "layernorm" in name or "layer_norm" in name:
            return "norm"
        if name.endswith(".bias"):
            return "bias"
        if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
            return "residual"
        return "weight"

    def init_key(self, global_name: str, model: ModelConfig) -> str:
        """Name whose seeded draw initialises ``global_name``. A tied output layer (the copy
        megatron-core keeps on the last pipeline stage) draws the embedding's numbers."""
        if model.tie_word_embeddings and global_name == "output_layer.weight":
            return "embedding.word_embeddings.weight"
        return global_name

    # -- counts --------------------------------------------------------------------------------

    def matmul_weights(self, model: ModelConfig, vocab: int) -> dict[str, int]:
        """Weight elements of each matrix multiply (one multiply-add per token each), summed over
        layers. ``logits`` is counted whether or not its matrix is the embedding's."""
        d = ModelDims.of(model)
        layers, h = d.num_layers, d.hidden_size
        return {"qkv": layers * h * (d.q_width + 2 * d.kv_width),
                "out_proj": layers * d.q_width * h,
                # SwiGLU: gate and up projections (h -> ffn each), down projection (ffn -> h).
                "mlp": layers * 3 * h * d.ffn_hidden_size,
                "logits": h * vocab}

    def layer_vector_params(self, model: ModelConfig) -> dict[str, int]:
        """Parameters of one layer outside matrix multiplies: ``norms`` (replicated across TP)
        and ``biases`` (split across TP like their projection)."""
        d = ModelDims.of(model)
        return {"norms": 2 * d.hidden_size,
                "biases": d.q_width + 2 * d.kv_width if model.qkv_bias else 0}

    # -- Hugging Face ----------------------------------------------------------------------------

    def hf_mapping(self, model: ModelConfig) -> list:
        """The declarative weight mapping (``flagscale.models.hf_mapping`` entries) in file order:
        entries before the per-layer ones, the per-layer ones (repeated for every layer), then
        the rest."""
        raise NotImplementedError

    def hf_refusals(self) -> list[tuple[str, Any, str]]:
        """``(config.json key, the only supported value, what another value means)``."""
        # attention_bias (in Llama's config) also puts a bias on o_proj, which megatron-core's
        # add_qkv_bias does not; Qwen2's q/k/v biases are implied by its architecture instead.
        refusals = [("hidden_act", "silu", "an activation other than silu (SwiGLU)"),
                    ("attention_bias", False, "attention projections with bias"),
                    ("mlp_bias", False, "MLP projections with bias")]
        if not self.tied_embeddings:
            refusals.append(("tie_word_embeddings", False, "tied input/output embeddings"))
        return refusals

    def hf_sliding_window(self, config: dict) -> Optional[int]:
        """The attention window a config asks for, ``None`` for full causal attention. Read for
        every family: a Mistral relabeled as Llama keeps its window, and is refused for it."""
        return config.get("sliding_window")

    def from_hf_config(self, config: dict, where: str = "config.json") -> dict[str, Any]:
        """``ModelConfig`` fields of a Hugging Face ``config.json`` of this family; refuses, by
        key, what megatron-core cannot run."""
        missing = [k for k in HF_REQUIRED_KEYS if k not in config]
        if missing:
            raise ConversionError(f"{where}: missing key(s) {', '.join(missing)}; a "
                                  f"{self.hf_architectures[0]} config needs "
                                  f"{', '.join(HF_REQUIRED_KEYS)}.")
        for key, supported, what in self.hf_refusals():
            if key in config and config[key] != supported:
                raise ConversionError(f"{where}: {key}={config[key]!r} ({what}) is not supported; "
                                      f"flagscale's megatron-core model needs {key}={supported!r}.")
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        head_dim = config.get("head_dim")
        if head_dim is not None and int(head_dim) * heads != hidden:
            raise ConversionError(f"{where}: head_dim={head_dim} * num_attention_heads={heads} != "
                                  f"hidden_size={hidden}; flagscale derives the head size as "
                                  f"hidden_size / num_attention_heads.")
        context = int(config.get("max_position_embeddings", 4096))
        window = self.hf_sliding_window(config)
        if window is not None and int(window) < context:
            raise ConversionError(
                f"{where}: sliding_window={window} is smaller than max_position_embeddings="
                f"{context}; megatron-core's attention here is full causal attention and cannot "
                f"express a window. The model equals full attention only on sequences up to "
                f"{window} tokens: to train at that length, set max_position_embeddings to "
                f"{window} and sliding_window to null in config.json.")
        theta, factor = _rope(config, where)
        return dict(family=self.name, num_layers=int(config["num_hidden_layers"]),
                    hidden_size=hidden, num_attention_heads=heads,
                    num_query_groups=int(config.get("num_key_value_heads") or heads),
                    ffn_hidden_size=int(config["intermediate_size"]),
                    vocab_size=int(config["vocab_size"]), max_position_embeddings=context,
                    rope_theta=theta, rope_scaling_factor=factor,
                    norm_epsilon=float(config.get("rms_norm_eps", 1e-5)),
                    init_method_std=float(config.get("initializer_range", 0.02)),
                    qkv_bias=self.qkv_bias,
                    tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))

    def hf_config_extra(self, model: ModelConfig) -> dict[str, Any]:
        """``config.json`` keys only this family's Hugging Face config has."""
        return {}

    def to_hf_config(self, model: ModelConfig, dtype: str, bos: Optional[int],
                     eos: Optional[int], pad: Optional[int],
                     transformers_version: Optional[str]) -> dict:
        """``config.json`` for ``model``, in the layout of ``transformers_version`` (the newest
        layout when ``None``): ``rope_parameters`` from 5.x, ``rope_theta``/``rope_scaling``
        before."""
        major = None if transformers_version is None else int(transformers_version.split(".")[0])
        config = {
            "architectures": [self.hf_architectures[0]], "model_type": self.hf_model_types[0],
            "hidden_size": model.hidden_size, "intermediate_size": model.ffn_hidden_size,
            "num_hidden_layers": model.num_layers,
            "num_attention_heads": model.num_attention_heads,
            "num_key_value_heads": model.num_query_groups or model.num_attention_heads,
            "head_dim": model.hidden_size // model.num_attention_heads,
            "vocab_size": model.vocab_size,
            "max_position_embeddings": model.max_position_embeddings,
            "rms_norm_eps": model.norm_epsilon, "hidden_act": "silu",
            "initializer_range": model.init_method_std, "attention_dropout": 0.0,
            "tie_word_embeddings": model.tie_word_embeddings, "use_cache": True,
            "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
            ("dtype" if major is None or major >= 5 else "torch_dtype"): dtype,
            **self.hf_config_extra(model),
        }
        scaling = None
        if model.rope_scaling_factor is not None:
            scaling = {"rope_type": "llama3", "factor": float(model.rope_scaling_factor),
                       **MCORE_LLAMA3_FIXED}
        if major is None or major >= 5:
            config["rope_parameters"] = {"rope_type": "default", **(scaling or {}),
                                         "rope_theta": float(model.rope_theta)}
        else:
            config["rope_theta"] = float(model.rope_theta)
            config["rope_scaling"] = scaling
        if transformers_version is not None:
            config["transformers_version"] = transformers_version
        return config


def _rope(config: dict, where: str) -> tuple[float, Optional[float]]:
    """(rope_theta, llama3 scaling factor or None) from either rope layout: top-level
    ``rope_theta`` + ``rope_scaling`` (transformers < 5) or ``rope_parameters`` (5.x)."""
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        theta, scaling = params.get("rope_theta", config.get("rope_theta", 10000.0)), params
    else:
        theta, scaling = config.get("rope_theta", 10000.0), config.get("rope_scaling")
    if not scaling:
        return float(theta), None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ConversionError(f"{where}: rope type '{rope_type}' is not supported; megatron-core "
                              f"0.16.1's GPTModel implements only plain RoPE and 'llama3' scaling.")
    for key, fixed in MCORE_LLAMA3_FIXED.items():
        value = scaling.get(key, fixed)
        if float(value) != fixed:
            raise ConversionError(f"{where}: rope scaling {key}={value} cannot be expressed: "
                                  f"megatron-core 0.16.1 fixes it at {fixed:g} (only 'factor' is "
                                  f"configurable).")
    if "factor" not in scaling:
        raise ConversionError(f"{where}: llama3 rope scaling has no 'factor'.")
    return float(theta), float(scaling["factor"])


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a family (called once by each family module)."""
    _REGISTRY[spec.name] = spec
    return spec


def families() -> list[str]:
    """Registered ``model.family`` values."""
    return sorted(_REGISTRY)


def get_model_spec(model: ModelConfig | str) -> ModelSpec:
    """The spec of ``model.family`` (or of a family name); ConfigError naming the known ones."""
    family = model if isinstance(model, str) else model.family
    if family not in _REGISTRY:
        raise ConfigError(f"model.family={family!r} is not a known model family. Known: "
                          f"{', '.join(families())}.")
    return _REGISTRY[family]


def check_model(model: ModelConfig) -> None:
    """Refuse, before anything is built, a model config its family cannot express."""
    get_model_spec(model).check(model)


def architecture_keys(model: ModelConfig) -> tuple[str, ...]:
    """``ModelConfig`` fields a checkpoint of ``model`` must match to be loaded into it."""
    return get_model_spec(model).architecture_keys()


def spec_for_hf_config(config: dict, where: str = "config.json") -> ModelSpec:
    """The family of a Hugging Face ``config.json`` (by ``architectures``, else ``model_type``)."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    for spec in _REGISTRY.values():
        by_arch = any(a in spec.hf_architectures for a in archs)
        if (by_arch or (not archs and model_type in spec.hf_model_types)) and \
                model_type in (None, *spec.hf_model_types):
            return spec
    known = [a for spec in _REGISTRY.values() for a in spec.hf_architectures]
    raise ConversionError(f"{where}: architecture {archs} (model_type '{model_type}') is not "
                          f"supported; flagscale converts {', '.join(known)}.")
