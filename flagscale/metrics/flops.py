"""Parameter counts and training FLOPs per token of a model of any family in ``flagscale.models``.

    est = flops_per_token(preset_model("llama3_8b"), seq_length=8192)
    est.flops_per_token / 1e9          # 51.47 GFLOP/token, Megatron's convention
    est.terms                          # {'qkv': ..., 'attention': ..., 'out_proj': ..., ...}

The family's spec says which matrix multiplies the model has and which parameters sit outside
them (norms, q/k/v biases, a tied output layer); this module turns those into the conventions
below. Every figure counts one training step per token: forward plus backward (the backward pass
does two matrix multiplies per forward one, hence x3) at 2 FLOPs per multiply-add, so each term
below is ``6 * multiply-adds per token``. Only matrix multiplies are counted (norms, biases, RoPE,
softmax and the loss are memory-bound and negligible), which is what model FLOPs utilisation (MFU)
is defined on.

Three conventions, labelled wherever a figure is reported because they differ by up to ~15%:

- ``megatron`` (default): Megatron-LM's ``num_floating_point_operations`` (REFERENCE section 3):
  grouped-query attention, SwiGLU, causal attention counted as half of full, logits over the
  vocabulary padded to a multiple of ``make_vocab_size_divisible_by * tp``.
- ``palm``: PaLM appendix B / torchtitan: ``6 * N + 12 * L * heads * d_head * S`` with N every
  parameter except the input embedding (a lookup, not a multiply) and full (non-causal) attention.
  With tied embeddings the shared matrix is counted in N once, as the output layer it also is.
- ``6n``: Kaplan et al. 2020: ``6 * N`` with the same N and no attention-context term.

Activation recomputation repeats forward work the model does not need; it is reported separately as
hardware FLOPs (``hardware_flops_per_token``, for HFU) and never enters ``flops_per_token`` (MFU).
It counts exactly what megatron-core recomputes and the memory planner (``flagscale.plan.memory``)
stops storing, from the same :func:`recomputed_layers`: ``full`` repeats the forward of every
recomputed layer (all with ``uniform``, the first ``recompute_num_layers`` of each (virtual)
pipeline stage with ``block``), ``selective`` the forward of each module of ``recompute_modules``
in every layer (``core_attn``: the attention term; ``mlp``: the MLP term; ``layernorm``: the norms,
counted only by the conventions that count norms).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from flagscale.config.loader import padded_vocab_size, pipeline_split
from flagscale.config.parallel_dims import ParallelDims
from flagscale.config.presets import MODEL_PRESETS
from flagscale.config.schema import Config, ModelConfig
from flagscale.errors import ConfigError
from flagscale.models import ModelDims, get_model_spec

CONVENTIONS = ("megatron", "palm", "6n")
"""Names accepted by :func:`flops_per_token` (``convention=``)."""


def preset_model(name: str) -> ModelConfig:
    """The :class:`ModelConfig` of a named preset (``llama3_8b``, ``aquila2_34b``, ``tiny`` ...)."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"Unknown model preset '{name}'. Known: "
                          f"{', '.join(sorted(MODEL_PRESETS))}.")
    return ModelConfig(preset=name, **MODEL_PRESETS[name])


def padded_vocab(model: ModelConfig, tp: int = 1) -> int:
    """Vocabulary rows of the embedding and output layer as megatron-core allocates them."""
    return padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp)


def _check_sizes(model: ModelConfig) -> None:
    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                 "vocab_size"):
        if getattr(model, name) <= 0:
            raise ConfigError(f"model.{name} is {getattr(model, name)}: set model.preset or "
                              f"give model.{name} to count parameters and FLOPs.")


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of a model (a tied embedding/output matrix counted once)."""

    total: int
    """Every parameter: embedding, layers, final norm, output layer (unless tied)."""
    embedding: int
    """Input embedding (a table lookup: no FLOPs)."""
    non_embedding: int
    """``total - embedding``: the parameters that take part in matrix multiplies, plus norms and
    biases."""
    per_layer: int
    """One transformer layer (attention, MLP, biases and its two RMSNorm weights)."""
    per_layer_replicated: int
    """Of ``per_layer``, what tensor parallelism replicates instead of splitting (the norms)."""
    output: int
    """Output layer weights; 0 when tied to the embedding (the same matrix)."""
    vocab_size: int
    """Vocabulary rows counted in the embedding and output layer."""


def count_params(model: ModelConfig, vocab_size: Optional[int] = None) -> ParamCount:
    """Count the parameters of ``model``; ``vocab_size`` defaults to the model's true vocabulary.

    Pass ``padded_vocab(model, tp)`` to count what megatron-core allocates (the published figures,
    e.g. 8.03B for Llama-3-8B, use the true vocabulary).
    """
    vocab = model.vocab_size if vocab_size is None else vocab_size
    _check_sizes(model)
    spec = get_model_spec(model)
    weights = spec.matmul_weights(model, vocab)
    vectors = spec.layer_vector_params(model)
    layers, hidden = model.num_layers, model.hidden_size
    embedding = vocab * hidden
    output = 0 if model.tie_word_embeddings else weights["logits"]
    layer_weights = weights["qkv"] + weights["out_proj"] + weights["mlp"]
    per_layer = layer_weights // layers + sum(vectors.values())
    total = embedding + layers * per_layer + hidden + output  # + hidden: the final norm
    return ParamCount(total=total, embedding=embedding, non_embedding=total - embedding,
                      per_layer=per_layer, per_layer_replicated=vectors["norms"], output=output,
                      vocab_size=vocab)


@dataclass(frozen=True)
class FlopsEstimate:
    """Training FLOPs per token (forward + backward) with a per-term breakdown."""

    convention: str
    """``megatron``, ``palm`` or ``6n``."""
    seq_length: int
    causal: bool
    """Attention counted over the causal half of the score matrix."""
    vocab_size: int
    """Vocabulary rows counted in the logits (padded in the megatron convention)."""
    terms: dict[str, float] = field(default_factory=dict)
    """Model FLOPs per token by term: ``qkv``, ``attention`` (scores and values), ``out_proj``,
    ``mlp``, ``logits`` (and ``norms`` in the parameter-count conventions)."""
    recompute: str = "none"
    """Activation recomputation the hardware FLOPs include: ``none``, ``selective``, ``full``."""
    recompute_flops_per_token: float = 0.0
    """Forward work repeated by activation recomputation, per token."""

    @property
    def flops_per_token(self) -> float:
        """Model FLOPs per token: what MFU is computed from."""
        return float(sum(self.terms.values()))

    @property
    def hardware_flops_per_token(self) -> float:
        """Model FLOPs plus recomputation: what the hardware executes (HFU)."""
        return self.flops_per_token + self.recompute_flops_per_token

    def as_dict(self) -> dict:
        """Plain data for JSON: totals, the breakdown and the labels needed to read them."""
        return {"convention": self.convention, "seq_length": self.seq_length,
                "causal_attention": self.causal, "vocab_size": self.vocab_size,
                "flops_per_token": self.flops_per_token, "breakdown": dict(self.terms),
                "recompute": self.recompute,
                "recompute_flops_per_token": self.recompute_flops_per_token,
                "hardware_flops_per_token": self.hardware_flops_per_token}


def recomputed_layers(cfg: Config, stage_layers: int, recompute: str) -> int:
    """Layers of a (virtual) stage of ``stage_layers`` whose whole forward is recomputed:
    ``full`` + ``uniform`` all of them (in groups of ``recompute_num_layers``), ``full`` +
    ``block`` the first ``recompute_num_layers`` (default all), otherwise none."""
    t = cfg.train
    if recompute != "full":
        return 0
    if t.recompute_method == "block":
        return min(stage_layers, t.recompute_num_layers or stage_layers)
    return stage_layers


def flops_per_token(model: ModelConfig, seq_length: int, tp: int = 1,
                    convention: str = "megatron", causal: Optional[bool] = None,
                    recompute: str = "none", recompute_layers: Optional[int] = None,
                    recompute_modules: Optional[Sequence[str]] = None) -> FlopsEstimate:
    """Training FLOPs per token of ``model`` at ``seq_length`` (see the module docstring).

    ``tp`` only matters through the vocabulary padding (multiple of ``128 * tp``). ``causal``
    overrides the convention's attention counting (megatron: causal; palm: full) to compare like
    with like against a counter that sees a full score matrix. ``recompute`` adds the repeated
    forward work to ``hardware_flops_per_token`` only: with ``full``, of ``recompute_layers``
    layers (default all); with ``selective``, of ``recompute_modules`` (default ``core_attn``).
    """
    if convention not in CONVENTIONS:
        raise ConfigError(f"FLOPs convention '{convention}' is not one of "
                          f"{', '.join(CONVENTIONS)}.")
    if recompute not in ("none", "selective", "full"):
        raise ConfigError(f"recompute '{recompute}' is not one of none, selective, full.")
    if seq_length < 1 or tp < 1:
        raise ConfigError(f"seq_length ({seq_length}) and tp ({tp}) must be at least 1.")
    vocab = padded_vocab(model, tp)
    _check_sizes(model)
    spec = get_model_spec(model)
    layers = model.num_layers
    q_width = ModelDims.of(model).q_width
    causal = (convention == "megatron") if causal is None else causal
    # Each weight element is one multiply-add per token in the forward pass: x2 FLOPs, x3 with the
    # backward pass (gradients of inputs and of weights).
    terms = {name: 6.0 * n for name, n in spec.matmul_weights(model, vocab).items()}
    # Scores Q.K^T and the weighted sum over V: each is q multiply-adds per (token, key) pair, so
    # 2*q*S per token with full attention; a causal mask leaves on average S/2 keys per query.
    attention = 6.0 * layers * 2 * q_width * seq_length * (0.5 if causal else 1.0)
    if convention != "6n":
        terms = {"qkv": terms["qkv"], "attention": attention, **terms}
    if convention != "megatron":
        # The parameter-count conventions charge 6 FLOPs to every non-embedding parameter,
        # including the RMSNorm weights and biases (elementwise, but inside N by definition).
        vectors = spec.layer_vector_params(model)
        terms["norms"] = 6.0 * (layers * vectors["norms"] + model.hidden_size)
        if vectors["biases"]:
            terms["biases"] = 6.0 * layers * vectors["biases"]
    # Recomputation repeats forward passes, 1/3 of a forward+backward term: full recomputation
    # the whole transformer layers recomputed (each term above sums over all layers alike, so a
    # share of layers is that share of it), selective the listed modules of every layer. The
    # output layer is never recomputed.
    if recompute == "full":
        layer_forward = sum(v for k, v in terms.items()
                            if k in ("qkv", "attention", "out_proj", "mlp"))
        share = layers if recompute_layers is None else recompute_layers
        repeated = layer_forward / 3 * share / layers
    elif recompute == "selective":
        module_terms = {"core_attn": "attention", "mlp": "mlp", "layernorm": "norms"}
        repeated = sum(terms.get(module_terms[m], 0.0)
                       for m in (recompute_modules or ["core_attn"])) / 3
        if "norms" in terms and "layernorm" in (recompute_modules or []):
            # The norms term also holds the final norm, which no layer recomputes.
            repeated -= 6.0 * model.hidden_size / 3
    else:
        repeated = 0.0
    return FlopsEstimate(convention=convention, seq_length=seq_length, causal=causal,
                         vocab_size=vocab, terms=terms, recompute=recompute,
                         recompute_flops_per_token=repeated)


def recompute_of_config(cfg: Config) -> dict:
    """The recomputation arguments of :func:`flops_per_token` for a run config:
    ``train.recompute``, the layers it recomputes (``recompute_method`` and
    ``recompute_num_layers`` over the config's pipeline split) and ``recompute_modules``."""
    t, p = cfg.train, cfg.parallel
    layers = None
    if t.recompute == "full":
        # The data-parallel size does not change the pipeline split.
        dims = ParallelDims(tp=p.tp, pp=p.pp, cp=p.cp, dp=1, vpp=p.vpp)
        chunks = dims.vpp or 1
        layers = sum(chunks * recomputed_layers(cfg, stage // chunks, "full")
                     for stage in pipeline_split(cfg, dims))
    return {"recompute": t.recompute, "recompute_layers": layers,
            "recompute_modules": t.recompute_modules}


def flops_for_config(cfg: Config, convention: str = "megatron") -> FlopsEstimate:
    """FLOPs per token of a run config: its model, ``train.seq_length``, ``parallel.tp`` and
    its recomputation (:func:`recompute_of_config`)."""
    return flops_per_token(cfg.model, cfg.train.seq_length, tp=cfg.parallel.tp,
                           convention=convention, **recompute_of_config(cfg))
