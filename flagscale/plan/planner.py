"""Enumerate the parallel layouts of a model on N GPUs and estimate each one's memory per GPU.

    plan = plan_layouts(load_config("examples/aquila2_34b/h100_64nodes.yaml"), gpus=512)
    plan = plan_for(None, "llama3_8b", gpus=8)  # a config file or a preset, with options
    plan.best.tp, plan.best.pp                   # the preferred layout that fits
    require_fit(cfg, gpus=512)                   # the config's own layout, or ConfigError
    print(format_plan(plan)); plan.as_dict()    # table for humans, JSON for tools

A layout is valid when :func:`flagscale.config.validate` accepts it for the world size: ``tp`` a
divisor of 8 (one node's NVLink domain) dividing the heads and query groups, ``pp`` dividing the
layers (the configured layout may split them unevenly, ``parallel.num_layers_in_*`` /
``account_for_*``), the config's ``parallel.cp``, ``dp = gpus / (tp * pp * cp)``
(:meth:`ParallelDims.from_world`) and, for a run config, the global batch split evenly over
``dp``.
Sequence parallelism is on wherever ``tp > 1``: it divides the activations the TP group would
otherwise replicate at no extra communication volume (the configured layout keeps the config's
``parallel.sequence_parallel`` and ``parallel.vpp``). Layouts are ordered by preference: those
that fit first, then fewer model-parallel GPUs (``tp * pp``: less communication, larger ``dp``),
then fewer pipeline stages (smaller bubble), then lower memory.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from flagscale.config import Config, ParallelDims, default_seq_length, load_config, validate
from flagscale.errors import ConfigError
from flagscale.metrics.flops import count_params
from flagscale.plan.memory import (DEVICE_MEMORY_GIB, FRAGMENTATION, GIB, RESERVED_GIB,
                                   MemoryEstimate, estimate_memory, usable_gib)

TP_SIZES = (1, 2, 4, 8)
"""Tensor-parallel sizes considered: divisors of the 8 GPUs an NVLink node holds."""


@dataclass(frozen=True)
class LayoutPlan:
    """One layout and its memory estimate."""

    dims: ParallelDims
    sequence_parallel: bool
    memory: MemoryEstimate
    fits: bool
    configured: bool = False
    """The layout the run config asks for (``parallel.*``)."""
    num_microbatches: int = 1
    """Microbatches per step on each data-parallel rank."""

    @property
    def bubble_fraction(self) -> float:
        """Pipeline bubble of the (interleaved) 1F1B schedule relative to the ideal step:
        ``(pp - 1) / (vpp * microbatches)`` (Narayanan et al. 2021, section 2.2)."""
        return (self.dims.pp - 1) / ((self.dims.vpp or 1) * self.num_microbatches)

    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def pp(self) -> int:
        return self.dims.pp

    @property
    def dp(self) -> int:
        return self.dims.dp

    def as_dict(self) -> dict:
        """The contract's keys (``tp``, ``pp``, ``cp``, ``vpp``, ``dp``, ``memory_gib_per_gpu``,
        ``fits``) plus ``sequence_parallel``, ``worst_stage`` and ``configured``."""
        return {**self.dims.to_dict(), "sequence_parallel": self.sequence_parallel,
                "memory_gib_per_gpu": self.memory.as_dict(), "worst_stage": self.memory.stage,
                "bubble_fraction": round(self.bubble_fraction, 4),
                "fits": self.fits, "configured": self.configured}


@dataclass
class Plan:
    """Every valid layout of a model on ``gpus`` devices, preferred first."""

    model: str
    params: int
    gpus: int
    device: str
    usable_gib: float
    seq_length: int
    micro_batch_size: int
    recompute: str
    attention: str
    params_dtype: str
    layouts: list[LayoutPlan] = field(default_factory=list)

    @property
    def best(self) -> Optional[LayoutPlan]:
        """The preferred layout that fits, or None when none does."""
        return next((lay for lay in self.layouts if lay.fits), None)

    def as_dict(self) -> dict:
        """Plain data for ``plan --json``."""
        return {"model": self.model, "params": self.params, "gpus": self.gpus,
                "device": self.device, "device_memory_gib": DEVICE_MEMORY_GIB[self.device],
                "usable_gib": round(self.usable_gib, 3), "seq_length": self.seq_length,
                "micro_batch_size": self.micro_batch_size, "recompute": self.recompute,
                "attention": self.attention, "params_dtype": self.params_dtype,
                "layouts": [lay.as_dict() for lay in self.layouts]}


def _candidate(cfg: Config, dims: ParallelDims, configured: bool,
               batch_from_config: bool) -> Config:
    """``cfg`` at one layout: the configured layout keeps the config's own sequence-parallel and
    virtual-pipeline settings, the others get SP wherever tp > 1 and no interleaving."""
    candidate = copy.deepcopy(cfg)
    p = cfg.parallel
    uneven = {} if configured else dict(
        num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None,
        account_for_embedding_in_pipeline_split=False, account_for_loss_in_pipeline_split=False)
    candidate.parallel = dataclasses.replace(
        p, tp=dims.tp, pp=dims.pp, dp=None,
        sequence_parallel=p.sequence_parallel if configured else dims.tp > 1,
        vpp=p.vpp if configured else None, **uneven)
    if not batch_from_config:
        # A bare model has no batch: assume enough microbatches to fill the pipeline.
        candidate.train.global_batch_size = candidate.train.micro_batch_size * dims.dp * dims.pp
        candidate.train.rampup_batch_size = None
    return candidate


def plan_layouts(cfg: Config, gpus: int, device: str = "h100-sxm",
                 recompute: Optional[str] = None, attention: str = "flash",
                 batch_from_config: bool = True) -> Plan:
    """Estimate every valid layout of ``cfg``'s model on ``gpus`` GPUs of ``device``.

    The sequence length, micro batch, precision, recomputation (unless ``recompute`` is given),
    distributed optimizer and, with ``batch_from_config``, the global batch (microbatches in
    flight, batch divisibility) and ``parallel.vpp`` come from ``cfg``. The configured layout is
    marked (``configured``) when it is among the valid ones. Raises :class:`ConfigError` when no
    layout is valid.
    """
    if gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}.")
    budget = usable_gib(device)
    recompute = recompute or cfg.train.recompute
    m = cfg.model
    layouts, rejected = [], {}
    cp = cfg.parallel.cp
    for tp in TP_SIZES:
        for pp in range(1, m.num_layers + 1):
            configured = batch_from_config and (tp, pp) == (cfg.parallel.tp, cfg.parallel.pp)
            if m.num_layers % pp and not configured:
                continue  # only the configured layout carries an uneven split
            try:
                dims = ParallelDims.from_world(gpus, tp=tp, pp=pp, cp=cp)
            except ConfigError:
                continue  # gpus is not a multiple of tp * pp * cp
            candidate = _candidate(cfg, dims, configured, batch_from_config)
            sp = candidate.parallel.sequence_parallel
            try:
                layout = validate(candidate, gpus, check_paths=False)
            except ConfigError as exc:
                rejected[dims.describe()] = str(exc)
                continue
            memory = estimate_memory(candidate, layout.tp, layout.pp, layout.dp, sp,
                                     vpp=layout.vpp, recompute=recompute, attention=attention,
                                     num_microbatches=layout.num_microbatches, cp=layout.cp)
            layouts.append(LayoutPlan(layout.dims, sp, memory, memory.total_gib <= budget,
                                      configured, layout.num_microbatches))
    if not layouts:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(rejected.items())[:3])
        raise ConfigError(f"No parallel layout of {m.preset or 'the model'} fits the arithmetic "
                          f"of {gpus} GPUs (tp in {TP_SIZES} dividing heads and query groups, pp "
                          f"dividing {m.num_layers} layers, the global batch divisible by "
                          f"micro_batch_size*dp). First rejections: {reasons or 'none'}. Choose "
                          f"a GPU count that is a multiple of the tensor/pipeline sizes.")
    layouts.sort(key=lambda lay: (not lay.fits, lay.dims.model_parallel_size, lay.pp,
                                  lay.memory.total))
    return Plan(model=m.preset or "custom", params=count_params(m).total, gpus=gpus,
                device=device, usable_gib=budget, seq_length=cfg.train.seq_length,
                micro_batch_size=cfg.train.micro_batch_size, recompute=recompute,
                attention=attention, params_dtype=m.params_dtype, layouts=layouts)


def configured_layout(cfg: Config, gpus: int, device: str = "h100-sxm",
                      attention: str = "flash") -> LayoutPlan:
    """The memory estimate of the layout ``cfg`` asks for (its own ``parallel.*``) on ``gpus``
    GPUs of ``device``: what a launch of ``cfg`` will need. ConfigError when the layout is
    invalid for ``gpus``."""
    layout = validate(cfg, gpus, check_paths=False)
    sp = cfg.parallel.sequence_parallel
    memory = estimate_memory(cfg, layout.tp, layout.pp, layout.dp, sp, vpp=layout.vpp,
                             attention=attention, num_microbatches=layout.num_microbatches)
    return LayoutPlan(layout.dims, sp, memory, memory.total_gib <= usable_gib(device),
                      configured=True)


def require_fit(cfg: Config, gpus: int, device: str = "h100-sxm",
                attention: str = "flash") -> LayoutPlan:
    """:func:`configured_layout`, or ConfigError when it does not fit in ``device``'s memory,
    with the GiB needed against those available and the preferred layout that fits, if any."""
    lay = configured_layout(cfg, gpus, device, attention)
    if lay.fits:
        return lay
    mem = lay.memory
    try:
        best = plan_layouts(cfg, gpus, device=device, attention=attention).best
    except ConfigError:
        best = None
    t = cfg.train
    remedies = ["more GPUs", *(["train.recompute=full"] if t.recompute != "full" else []),
                *(["a smaller train.micro_batch_size"] if t.micro_batch_size > 1 else []),
                "a shorter train.seq_length"]
    advice = (f"The preferred layout that fits on {gpus} GPUs is tp={best.tp} pp={best.pp} "
              f"dp={best.dp} ({best.memory.total_gib:.1f} GiB/GPU): set parallel.tp={best.tp} "
              f"parallel.pp={best.pp}." if best else
              f"No layout of this model fits on {gpus} GPUs: use {', or '.join(remedies)}.")
    raise ConfigError(
        f"Layout {lay.dims.describe()} needs {mem.total_gib:.1f} GiB per GPU on its "
        f"{mem.stage} pipeline stage (weights {mem.params / GIB:.1f}, gradients "
        f"{mem.grads / GIB:.1f}, optimizer {mem.optimizer / GIB:.1f}, activations "
        f"{mem.activations / GIB:.1f}), but a {device} ({DEVICE_MEMORY_GIB[device]:g} GiB) has "
        f"{usable_gib(device):.1f} GiB usable. {advice}")


def plan_for(config: Optional[str], model: Optional[str], gpus: int, device: str = "h100-sxm",
             overrides: tuple[str, ...] = (), seq_len: Optional[int] = None,
             micro_batch: Optional[int] = None, recompute: Optional[str] = None,
             attention: str = "flash") -> Plan:
    """Plan a run config (``config``, a YAML path, with dotted ``overrides``) or a model preset
    (``model``: bf16 with the distributed optimizer at the preset's pretraining context and micro
    batch 1); ``seq_len`` and ``micro_batch`` override either's. Exactly one of ``config`` and
    ``model`` is given."""
    if (config is None) == (model is None):
        raise ConfigError("flagscale plan needs exactly one of CONFIG (a run config YAML) or "
                          "--model PRESET (e.g. --model llama3_8b).")
    if config is not None:
        cfg = load_config(config, overrides)
    else:
        cfg = load_config(None, [f"model.preset={model}", "model.params_dtype=bf16",
                                 "train.micro_batch_size=1", *overrides])
        cfg.train.seq_length = default_seq_length(cfg.model)
    if seq_len is not None:
        cfg.train.seq_length = seq_len
    if micro_batch is not None:
        cfg.train.micro_batch_size = micro_batch
    return plan_layouts(cfg, gpus, device=device, recompute=recompute, attention=attention,
                        batch_from_config=config is not None)


def format_plan(plan: Plan, limit: Optional[int] = None) -> str:
    """The human-readable table of a :class:`Plan` (preferred layouts first)."""
    lines = [f"model {plan.model}: {plan.params / 1e9:.2f}B parameters, {plan.params_dtype}, "
             f"seq {plan.seq_length}, micro batch {plan.micro_batch_size}, recompute "
             f"{plan.recompute}, {plan.attention} attention",
             f"{plan.gpus} x {plan.device} ({DEVICE_MEMORY_GIB[plan.device]:g} GiB): planning for "
             f"{plan.usable_gib:.1f} GiB per GPU (capacity - {RESERVED_GIB:g} GiB context/NCCL, "
             f"- {100 * FRAGMENTATION:.0f}% fragmentation)",
             f"{'tp':>3} {'pp':>4} {'cp':>3} {'vpp':>3} {'dp':>5} {'sp':>3} {'weights':>8} "
             f"{'grads':>8} {'optim':>8} {'activ':>8} {'total':>8}  GiB/GPU  {'bubble':>6}  "
             f"{'stage':<6}fits"]
    shown = plan.layouts if limit is None else plan.layouts[:limit]
    for lay in shown:
        mem = lay.memory
        gib = [v / GIB for v in (mem.params, mem.grads, mem.optimizer, mem.activations, mem.total)]
        mark = "  <- config" if lay.configured else ""
        sp = "on" if lay.sequence_parallel else "-"
        lines.append(f"{lay.tp:>3} {lay.pp:>4} {lay.dims.cp:>3} {lay.dims.vpp or '-':>3} "
                     f"{lay.dp:>5} {sp:>3} " + " ".join(f"{v:>8.1f}" for v in gib)
                     + f"           {lay.bubble_fraction:>6.1%}  {mem.stage:<6}"
                     f"{'yes' if lay.fits else 'no'}{mark}")
    if len(shown) < len(plan.layouts):
        lines.append(f"... {len(plan.layouts) - len(shown)} more (--all to show every layout)")
    best = plan.best
    lines.append(f"preferred: {best.dims.describe()}"
                 f"{' sequence_parallel' if best.sequence_parallel else ''} "
                 f"({best.memory.total_gib:.1f} GiB/GPU)" if best else
                 "no layout fits: raise the GPU count, use --recompute selective or full, or a "
                 "smaller --micro-batch / --seq-len")
    return "\n".join(lines)
