"""Per-GPU memory of one training layout: weights, gradients, optimizer state and activations.

    est = estimate_memory(cfg, tp=4, pp=4, dp=32, sequence_parallel=True)
    est.total_gib, est.as_dict()     # {'params': ..., 'grads': ..., 'optimizer': ..., ...}

The estimate is for the worst pipeline stage of a megatron-core run as flagscale configures it
(``flagscale.train`` / ``flagscale.models``), with the parameter counts of the model's family
(:func:`flagscale.metrics.flops.count_params`, which asks the family's spec):

Model state, per parameter held by the rank (its ``1/tp`` share of the matrices and biases of its
``L/pp`` layers; RMSNorm weights are replicated over TP; the input embedding lives on the first
stage, the final norm and the output layer on the last, both with the vocabulary padded to a
multiple of ``128 * tp``; with tied embeddings megatron-core keeps a copy of the embedding as the
last stage's output layer, so only a single-stage model holds the matrix once):

- weights: 2 bytes (bf16) or 4 (fp32);
- gradients: 4 bytes: megatron-core's DDP accumulates into an fp32 ``main_grad`` buffer, because
  flagscale sets ``grad_reduce_in_fp32`` for bf16 runs (fp32 runs are fp32 anyway); 2 bytes with
  ``parallel.grad_reduce_dtype: bf16``;
- optimizer: Adam's ``m`` and ``v`` in fp32 (4 + 4 bytes) plus, for bf16, the fp32 master copy
  (4 bytes): 12 bytes, or 8 for fp32. The distributed optimizer (ZeRO-1) shards all of it over the
  data-parallel group (with the context-parallel ranks), so it is divided by ``dp * cp``; the
  gradient buffer is not sharded.

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" (arXiv:2205.05198), section 4: a GPT layer stores ``s*b*h*(34 + 5*a*s/h)`` bytes (16-bit
activations, 1-byte dropout masks); with tensor and sequence parallelism all of it is divided by
``t``; with TP but no SP the ``10*s*b*h`` of layer-norm inputs and dropout masks stay whole.
The layer every family in ``flagscale.models`` builds (RMSNorm, grouped-query attention, SwiGLU)
differs from that GPT layer, so the terms are re-derived with the same method (``e`` = bytes per
activation element, ``g`` = query groups, ``f`` = SwiGLU width):

- dropout is off (``hidden_dropout = attention_dropout = 0``, as in Llama pretraining; torch's
  dropout at p=0 returns its input and keeps no mask): the mask bytes are gone;
- replicated across TP unless SP is on: the inputs of the two RMSNorms and of the QKV and fc1
  projections: ``4*s*b*h`` elements;
- split by TP: Q (``s*b*h``), K and V with grouped-query attention (``2*s*b*h*g/a``), the
  attention output feeding the output projection (``s*b*h``), the SwiGLU input (gate and up,
  ``2*s*b*f``) and its output feeding fc2 (``s*b*f``);
- the attention core: with fused (flash) attention, Transformer Engine's GPU path, only the
  softmax log-sum-exp in fp32 (``4*a*s*b`` bytes); megatron-core's unfused attention (local spec,
  no TE) keeps the ``a*s*s*b`` score matrix softmax output in fp32 for the softmax backward and in
  16 bits for the value product (``attention_softmax_in_fp32``): 6 bytes per score element. This
  is Korthikanti's ``5*a*s/h`` term without the dropout mask and with the fp32 softmax.

Without SP or recomputation a layer keeps ``s*b*h*(12 + 4*g/a + 6*f/h)`` bytes at 16 bits plus
the attention core; for Llama-3-8B (``g/a = 1/4``, ``f = 3.5h``) that is ``34*s*b*h``, the paper's
figure for its GPT layer (SwiGLU's wider MLP takes the place of the dropout masks).

Recomputation (megatron-core, as ``ModelSpec.transformer_config`` in ``flagscale.models`` sets it):
``selective`` keeps only the input of each module in ``train.recompute_modules`` (``core_attn``
removes the attention-core term, ``layernorm`` the two norm outputs, ``mlp`` the SwiGLU terms);
``full`` keeps only the input of each recomputed layer (``s*b*h`` elements, divided by ``t`` with
SP): every layer with ``uniform``, the first ``recompute_num_layers`` of each (virtual) stage with
``block``, the others fully; while one checkpointed group (``uniform``) or layer (``block``) is
recomputed in the backward pass, its full activations exist once.

Context parallelism gives each rank ``s/cp`` tokens of every sequence: every activation term is
divided by ``cp`` (with unfused attention each rank's score matrix is ``s/cp x s``).

Uneven pipeline splits (``parallel.num_layers_in_first/last_pipeline_stage``, or the embedding and
loss counted as layers) give the first and last stage their own layer counts
(:func:`flagscale.config.pipeline_split`).

Pipelining (1F1B, section 4.2.3): stage ``i`` of ``p`` holds ``p - i`` microbatches in flight, at
most the number of microbatches per step, so the first stage holds ``min(p, m)`` microbatches of
its ``L/p`` layers and the last stage one; the interleaved schedule multiplies the first stage's
by ``1 + (p - 1) / (p * vpp)``. The last stage also keeps the logits' softmax in fp32 for the
vocabulary-parallel cross entropy backward (``4*s*b*V/t`` bytes) and the inputs of the final norm
and output layer. The estimate is the larger of the first and last stage.

Not counted: temporary buffers of a single operation (e.g. the fp32 copy of the logits while the
loss is computed), communication buffers and the CUDA context; the device budget
(:func:`usable_gib`) sets memory aside for those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from flagscale.config.loader import padded_vocab_size, pipeline_split
from flagscale.config.parallel_dims import ParallelDims
from flagscale.config.schema import Config
from flagscale.errors import ConfigError
# The same count of recomputed layers as the hardware FLOPs (HFU) of the run.
from flagscale.metrics.flops import count_params, recomputed_layers

GIB = 2 ** 30

DEVICE_MEMORY_GIB: dict[str, float] = {
    # NVIDIA datasheets; HBM is sized in binary units (an "80GB" H100 reports just under 80 GiB).
    "h100-sxm": 80.0,
    "h100-pcie": 80.0,
    "h100-nvl": 94.0,
    "h200": 141.0,
    "h800": 80.0,
    "a100-80g": 80.0,
    "a100-40g": 40.0,
    "a800": 80.0,
}
"""Device memory in GiB per device key (``--device``)."""

RESERVED_GIB = 3.0
"""Set aside before anything else: CUDA context (~0.5-1 GiB), cuBLAS/Transformer Engine workspaces
and NCCL communicator buffers (one set per process group)."""

FRAGMENTATION = 0.10
"""Share of the rest lost to the caching allocator's fragmentation and to transient buffers the
estimate does not count (10% is typical of megatron-core runs without expandable segments)."""


def usable_gib(device: str) -> float:
    """Memory a layout may plan for on ``device``: ``(capacity - 3 GiB) * 0.9``."""
    if device not in DEVICE_MEMORY_GIB:
        raise ConfigError(f"Unknown device '{device}' for the memory planner. Known: "
                          f"{', '.join(DEVICE_MEMORY_GIB)} (pass one with --device).")
    return (DEVICE_MEMORY_GIB[device] - RESERVED_GIB) * (1.0 - FRAGMENTATION)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU on the layout's worst pipeline stage."""

    params: float
    grads: float
    optimizer: float
    activations: float
    stage: str
    """Which stage is the worst: ``first``, ``last`` or ``only`` (pp=1)."""

    @property
    def total(self) -> float:
        """All four terms, bytes."""
        return self.params + self.grads + self.optimizer + self.activations

    @property
    def total_gib(self) -> float:
        """:attr:`total` in GiB."""
        return self.total / GIB

    def as_dict(self) -> dict:
        """GiB per term plus ``total`` (what ``plan --json`` reports as ``memory_gib_per_gpu``)."""
        return {name: round(getattr(self, name) / GIB, 3)
                for name in ("params", "grads", "optimizer", "activations", "total")}


def _layer_activation_bytes(cfg: Config, tp: int, cp: int, sequence_parallel: bool,
                            recompute: str, attention: str) -> tuple[float, float, float]:
    """(bytes one microbatch keeps per layer, bytes of one fully stored layer, bytes of a layer
    whose whole forward is recomputed: its input only) on one TP/CP rank."""
    m, t = cfg.model, cfg.train
    # Context parallelism gives each rank s/cp tokens of every sequence.
    s, b, h, f = t.seq_length / cp, t.micro_batch_size, m.hidden_size, m.ffn_hidden_size
    a = m.num_attention_heads
    g = m.num_query_groups or a
    e = 2 if m.params_dtype == "bf16" else 4
    sbh = s * b * h
    sp = tp if sequence_parallel else 1
    norm_inputs, norm_outputs = 2 * sbh * e, 2 * sbh * e  # replicated over TP unless SP
    split = (sbh + 2 * sbh * g / a + sbh) * e           # Q, K, V, attention output
    mlp = 3 * s * b * f * e                              # SwiGLU input (gate, up) and fc2 input
    # Local queries attend to all s*cp keys: the score matrix is (s/cp) x s per rank.
    core = 4 * a * s * b if attention == "flash" else 6 * a * s * (s * cp) * b
    full_layer = (norm_inputs + norm_outputs) / sp + (split + mlp + core) / tp
    layer_input = sbh * e / sp
    if recompute == "selective":
        # megatron-core's recompute_modules: each listed module keeps only its input.
        modules = cfg.train.recompute_modules or ["core_attn"]
        saved = (("core_attn" in modules) * core / tp + ("layernorm" in modules) * norm_outputs / sp
                 + ("mlp" in modules) * mlp / tp)
        return full_layer - saved, full_layer, layer_input
    return full_layer, full_layer, layer_input


def estimate_memory(cfg: Config, tp: int, pp: int, dp: int, sequence_parallel: bool,
                    vpp: Optional[int] = None, recompute: Optional[str] = None,
                    attention: str = "flash", num_microbatches: Optional[int] = None,
                    cp: int = 1) -> MemoryEstimate:
    """Per-GPU memory of ``cfg``'s model trained at ``tp x pp x cp x dp`` (see the module
    docstring).

    ``recompute`` defaults to ``cfg.train.recompute`` (method, layer count and modules always
    come from ``cfg.train``); ``num_microbatches`` (per step) caps the microbatches in flight,
    None meaning at least ``pp``. Sequence length, micro batch, precision, the pipeline split
    (``parallel.num_layers_in_*`` / ``account_for_*``) and the distributed optimizer come from
    ``cfg``.
    """
    if attention not in ("flash", "unfused"):
        raise ConfigError(f"attention '{attention}' is not one of flash, unfused.")
    recompute = recompute or cfg.train.recompute
    if recompute not in ("none", "selective", "full"):
        raise ConfigError(f"recompute '{recompute}' is not one of none, selective, full.")
    m = cfg.model
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp)
    counts = count_params(m, vocab_size=vocab)
    split = pipeline_split(cfg, ParallelDims(tp=tp, pp=pp, cp=cp, dp=dp, vpp=vpp))
    replicated = counts.per_layer_replicated
    per_layer_params = (counts.per_layer - replicated) / tp + replicated
    vocab_params = counts.embedding / tp
    # The input embedding on the first stage; the final norm and output layer on the last (a tied
    # output layer there is megatron-core's copy of the embedding, the same size).
    stage_params = {"first": split[0] * per_layer_params + vocab_params,
                    "last": split[-1] * per_layer_params + m.hidden_size + vocab_params}

    per_layer, full_layer, layer_input = _layer_activation_bytes(
        cfg, tp, cp, sequence_parallel, recompute, attention)
    chunks = vpp or 1

    def stage_bytes(layers: int) -> tuple[float, float]:
        """(bytes one microbatch keeps on a stage of ``layers``, working set while recomputing)."""
        chunk_layers = layers // chunks
        recomputed = recomputed_layers(cfg, chunk_layers, recompute)
        kept = chunks * (recomputed * layer_input + (chunk_layers - recomputed) * per_layer)
        group = cfg.train.recompute_num_layers or 1
        # While one checkpointed group is recomputed in the backward pass its activations exist
        # once in full: one group of ``uniform``, one layer of ``block``.
        working = full_layer * (group if cfg.train.recompute_method == "uniform" else 1)
        return kept, working if recomputed else 0.0

    in_flight = pp if num_microbatches is None else min(pp, num_microbatches)
    if vpp and vpp > 1:
        in_flight *= 1 + (pp - 1) / (pp * vpp)
    s, b, e = (cfg.train.seq_length / cp, cfg.train.micro_batch_size,
               2 if m.params_dtype == "bf16" else 4)
    # Final-norm and output-layer inputs (sequence-sharded under SP) and the fp32 softmax the
    # vocabulary-parallel cross entropy saves for its backward.
    sp_shards = tp if sequence_parallel else 1
    logits = 2 * s * b * m.hidden_size * e / sp_shards + 4 * s * b * vocab / tp
    first_kept, first_working = stage_bytes(split[0])
    last_kept, last_working = stage_bytes(split[-1])
    stage_activations = {"first": in_flight * first_kept + first_working,
                         "last": last_kept + last_working + logits}
    if pp == 1:
        stage_params = {"only": stage_params["last"] + counts.output / tp}
        stage_activations = {"only": in_flight * first_kept + first_working + logits}

    weight_bytes = 2 if m.params_dtype == "bf16" else 4
    optimizer_bytes = 12 if m.params_dtype == "bf16" else 8
    # megatron-core's distributed optimizer shards over the data- and context-parallel ranks
    # together (its dp-cp group): CP ranks hold the same weights.
    shards = dp * cp if cfg.parallel.distributed_optimizer else 1
    grad_bytes = 2 if m.params_dtype == "bf16" and cfg.parallel.grad_reduce_dtype == "bf16" else 4
    estimates = [MemoryEstimate(params=n * weight_bytes, grads=n * grad_bytes,
                                optimizer=n * optimizer_bytes / shards,
                                activations=stage_activations[stage], stage=stage)
                 for stage, n in stage_params.items()]
    return max(estimates, key=lambda est: est.total)
