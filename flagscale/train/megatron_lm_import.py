"""Turn a Megatron-LM checkpoint (legacy ``mp_rank_*`` with ``distrib_optim.pt``, or
``torch_dist`` from its ``pretrain_gpt.py``) into a flagscale checkpoint with its optimizer state,
which flagscale then resumes or reshards at any layout.

    from flagscale.train.megatron_lm_import import import_megatron_lm
    imported = import_megatron_lm("megatron_ckpts/llama3_8b", "work/llama3_8b_flagscale")

``flagscale reshard --input`` and ``flagscale convert mcore-to-hf --input`` call it when their
input is a Megatron-LM checkpoint (:func:`flagscale.checkpoint.megatron_lm.find_megatron_lm`).

Why worker processes: a legacy ``distrib_optim.pt`` holds one flat fp32 buffer per DDP buffer,
with no names, in the order megatron-core's DDP lays parameters out; only the same model wrapped
in the same DDP at the same TP/PP knows where each parameter lies. So ``tp * pp`` local workers
(this module under torchrun) build the model exactly as flagscale trains it at the saved layout,
load each rank's ``model`` state dict and the optimizer's buffers with megatron-core's own
``DistributedOptimizer.load_parameter_state`` (``torch_dist``: megatron-core's distributed load),
set the LR schedule to where Megatron-LM's stood, and save a ``fully_reshardable`` flagscale
checkpoint. Megatron-LM's RNG states are not carried over (dropout-free Llama training draws
none).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from flagscale.checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint
from flagscale.checkpoint.megatron_lm import (LEGACY, MODEL_FILE, OPTIMIZER_FILE,
                                              MegatronLMCheckpoint, ddp_layout_overrides,
                                              flagscale_config, open_megatron_lm)
from flagscale.checkpoint.meta import RESHARDABLE
from flagscale.config import ParallelDims, config_to_dict, load_config, validate
from flagscale.errors import CheckpointError, ConfigError

WORKER_MODULE = "flagscale.train.megatron_lm_import"


def _tokenizer_vocab(args) -> Optional[int]:
    """The true vocabulary size from the tokenizer the run names, when flagscale can read it
    here (Megatron-LM records only the padded size)."""
    from flagscale.data import load_tokenizer
    from flagscale.errors import FlagScaleError

    spec = getattr(args, "tokenizer_model", None)
    if not spec or not Path(spec).exists():
        return None
    try:
        return load_tokenizer(spec).vocab_size
    except (FlagScaleError, OSError, ValueError):
        return None


def plan_import(input: str | os.PathLike,
                log: Callable[[str], None] = print) -> tuple[MegatronLMCheckpoint, dict,
                                                              ParallelDims]:
    """Every check that needs no process: the checkpoint complete, its model Llama-family, its
    layout valid for flagscale. Returns the checkpoint, its flagscale config and the layout the
    workers load it at (its own TP/PP/VPP on one data-parallel rank)."""
    ckpt = open_megatron_lm(input)
    config = flagscale_config(ckpt, _tokenizer_vocab(ckpt.args), log)
    # Context parallelism and data parallelism change no parameter's shape or place in the DDP
    # buffers, so one process per (tp, pp) rank converts it.
    dims = ParallelDims(tp=ckpt.dims.tp, pp=ckpt.dims.pp, dp=1, vpp=ckpt.dims.vpp)
    config["parallel"].update(cp=1, dp=1)
    try:
        validate(load_config(base=config), dims.world_size, check_paths=False)
    except ConfigError as exc:
        raise ConfigError(f"{ckpt.path}: the flagscale config its Megatron-LM args translate to "
                          f"does not hold: {exc}") from None
    return ckpt, config, dims


def import_megatron_lm(input: str | os.PathLike, work: str | os.PathLike,
                       platform: Optional[str] = None,
                       log: Callable[[str], None] = print) -> Path:
    """Convert the Megatron-LM checkpoint ``input`` into a flagscale checkpoint under ``work``
    (a new directory); returns the checkpoint directory. Every refusal comes before ``work``
    is created (:func:`plan_import`)."""
    from flagscale.launch.local import run_local

    plan, dims = write_plan(input, work, platform, log)
    code = run_local(dims.world_size, [str(plan)], module=WORKER_MODULE)
    return converted(plan, f"exit code {code}" if code else None)


def write_plan(input: str | os.PathLike, work: str | os.PathLike,
               platform: Optional[str] = None,
               log: Callable[[str], None] = print) -> tuple[Path, ParallelDims]:
    """Check ``input`` (:func:`plan_import`), create ``work`` and write into it the plan its
    workers run (:func:`convert_rank`); returns the plan file and the workers' layout."""
    ckpt, config, dims = plan_import(input, log)
    log(f"flagscale: detected a {ckpt.describe()}; converting it on {dims.world_size} worker "
        f"process(es)")
    work = Path(work)
    work.mkdir(parents=True)
    plan = work / "plan.json"
    plan.write_text(json.dumps({
        "input": str(ckpt.path), "format": ckpt.format, "iteration": ckpt.iteration,
        "consumed_samples": ckpt.consumed_samples,
        "scheduler_iterations": ckpt.scheduler_iterations, "config": config,
        "ddp": ddp_layout_overrides(ckpt), "layout": dims.to_dict(),
        "platform": platform or "auto", "checkpoints": str(work / "checkpoints")}))
    return plan, dims


def converted(plan: Path, failure: Optional[str] = None) -> Path:
    """The checkpoint the workers of ``plan`` saved; CheckpointError when they failed."""
    spec = json.loads(Path(plan).read_text())
    saved = complete_checkpoints(Path(spec["checkpoints"]))
    if failure or len(saved) != 1:
        why = failure or "no checkpoint saved"
        raise CheckpointError(f"Converting {spec['input']} failed on the worker process(es) at "
                              f"{ParallelDims.from_dict(spec['layout']).describe()} ({why}); "
                              f"their messages are above.")
    return saved[0]


# ---- worker side -----------------------------------------------------------------------------

def convert_rank(plan: str | os.PathLike) -> Path:
    """One worker of :func:`import_megatron_lm`: build the model at the saved layout, load this
    rank's share of the Megatron-LM checkpoint, save the flagscale checkpoint (collective)."""
    from flagscale.platform import setup_platform
    from flagscale.train.setup import build_training, init_model_parallel, init_process_group

    spec = json.loads(Path(plan).read_text())
    recorded = load_config(base=spec["config"])
    # The workers' DDP buckets must match the saving run's; the checkpoint records the plain
    # config, so training on from it chooses its own.
    cfg = dataclasses.replace(recorded, parallel=dataclasses.replace(recorded.parallel,
                                                                     **spec["ddp"]))
    platform = setup_platform(spec["platform"])
    _, world = init_process_group(platform)
    layout = validate(cfg, world, check_paths=False)
    init_model_parallel(cfg, layout)
    t = build_training(cfg, layout, platform)
    source = Path(spec["input"])
    if spec["format"] == LEGACY:
        _load_legacy(source, t.model, t.optimizer, layout.dims)
    else:
        load_checkpoint(source, t.model, t.optimizer, t.scheduler, cfg.model, layout)
    t.scheduler.step(increment=spec["scheduler_iterations"])
    return save_checkpoint(Path(spec["checkpoints"]), spec["iteration"], t.model, t.optimizer,
                           t.scheduler, spec["consumed_samples"], config_to_dict(recorded),
                           layout, optimizer_sharding=RESHARDABLE)


# Transformer Engine fuses each layer norm into the linear layer after it; megatron-core's local
# spec keeps it a module of its own. The same weight under either name.
_NORM_ALIASES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
                 "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
_NORM_ALIASES.update({v: k for k, v in _NORM_ALIASES.items()})


def _model_state(saved: dict, module: torch.nn.Module, where: Path) -> dict:
    """``saved`` renamed to ``module``'s parameter names; CheckpointError naming what is
    missing or left over. Transformer Engine's ``_extra_state`` (FP8 scaling metadata) is kept
    only where ``module`` has such entries too."""
    own = module.state_dict()
    state = {}
    for key, value in saved.items():
        if key not in own:
            prefix, _, rest = key.partition(".layers.")
            layer, _, name = rest.partition(".")
            alias = f"{prefix}.layers.{layer}.{_NORM_ALIASES.get(name, name)}" if rest else key
            key = alias if alias in own else key
        if key in own or not key.endswith("_extra_state"):
            state[key] = value
    missing = [k for k in own if k not in state and not k.endswith("_extra_state")]
    extra = [k for k in state if k not in own]
    if missing or extra:
        raise CheckpointError(
            f"{where}: its model weights do not match the model built from its args: missing "
            f"{missing[:4]}, unexpected {extra[:4]}. Was it saved by a Llama-family GPTModel "
            f"(megatron-core's gpt_layer_specs)?")
    return state


def _load_legacy(source: Path, model_chunks, optimizer, dims: ParallelDims) -> None:
    from megatron.core import parallel_state

    from flagscale.checkpoint.megatron_lm import rank_dir_name
    from flagscale.checkpoint.state import model_keys

    rank_dir = source / rank_dir_name(parallel_state.get_tensor_model_parallel_rank(),
                                      parallel_state.get_pipeline_model_parallel_rank(), dims.pp)
    file = rank_dir / MODEL_FILE
    # Megatron-LM pickles its argparse Namespace and numpy RNG states into this file.
    state = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
    for key, chunk in zip(model_keys(model_chunks), model_chunks):
        if key not in state:
            raise CheckpointError(f"{file} holds no '{key}' (it has {sorted(state)}): saved "
                                  f"with another number of virtual pipeline stages than its "
                                  f"args say.")
        module = getattr(chunk, "module", chunk)
        try:
            module.load_state_dict(_model_state(state[key], module, file), strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise CheckpointError(f"{file}: {exc}") from None
    # The fp32 optimizer's master weights are views of the model's own: keep what the model
    # file holds to check the flat buffers against.
    weights = {param: param.detach().clone() for chunk in model_chunks
               for param in chunk.parameters()}
    # Megatron-LM's order: the param groups (lr, step) first, then the flat buffers.
    optimizer.load_state_dict(state["optimizer"])
    _check_param_state(rank_dir / OPTIMIZER_FILE, optimizer)
    optimizer.load_parameter_state(str(rank_dir / OPTIMIZER_FILE))
    _check_master_weights(rank_dir / OPTIMIZER_FILE, optimizer, model_chunks, weights)


def _check_param_state(file: Path, optimizer) -> None:
    """Refuse ``distrib_optim.pt`` when its buffers are not the size this model's DDP buffers
    are (megatron-core would only assert it, deep inside the load)."""
    saved = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    states = saved if isinstance(saved, list) else [saved]
    expected = [[{(b.param_dtype, b.grad_dtype): b.numel_unpadded} for b in opt.buffers]
                for opt in inner]
    found = [[{dtype: entry["numel_unpadded"] for dtype, entry in state[i].items()}
              for i in range(len(opt.buffers)) if i in state]
             for opt, state in zip(inner, states)]
    if len(states) != len(inner) or found != expected:
        raise CheckpointError(
            f"{file}: its flat optimizer buffers hold {found} elements (per buffer and dtype), "
            f"the model built from the checkpoint's args lays out {expected}. The DDP bucket "
            f"layout differs from the run that saved it (args ddp_bucket_size, "
            f"overlap_grad_reduce) or the model is not the one its args describe.")


def _check_master_weights(file: Path, optimizer, model_chunks, weights: dict) -> None:
    """Refuse ``distrib_optim.pt`` unless every parameter's master weights in its flat buffers
    round to the weights the model file holds: the proof that each parameter was read from its
    own range (the buffers carry no names, only sizes)."""
    names = {param: name for chunk in model_chunks
             for name, param in getattr(chunk, "module", chunk).named_parameters()}
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for param in inner.model_param_group_index_map:
            main = inner._get_main_param_and_optimizer_states(param)["param"]
            span = inner._get_model_param_range_map(param)["param"]
            saved = weights[param].view(-1)[span.start:span.end]
            if not torch.equal(main.detach().view(-1).to(saved.dtype), saved):
                raise CheckpointError(
                    f"{file}: the master weights of {names[param]} in its flat buffers are not "
                    f"the weights {MODEL_FILE} holds: the parameters lie in the buffers in "
                    f"another order than in the model built from the checkpoint's args (another "
                    f"layer implementation or DDP bucketing than the run that saved it).")


def main(argv: list[str] | None = None) -> int:
    from flagscale.train.reshard_worker import run_worker

    return run_worker(sys.argv[1:] if argv is None else argv, convert_rank,
                      "flagscale.train.megatron_lm_import",
                      "`flagscale reshard` / `flagscale convert`")


def reshard_megatron_lm(input: str | os.PathLike, output: str | os.PathLike,
                        log: Callable[[str], None] = print, platform: Optional[str] = None,
                        **target) -> None:
    """``flagscale reshard`` of a Megatron-LM checkpoint: import it beside ``output``, then
    reshard that to the ``target`` layout (``tp``, ``pp``, ``dp``, ``vpp``, ``overwrite``)."""
    from flagscale.train.reshard import reshard

    with _imported(input, output, platform, log) as imported:
        reshard(imported, output, platform=platform, log=log, **target)


def megatron_lm_to_hf(input: str | os.PathLike, output: str | os.PathLike,
                      log: Callable[[str], None] = print, **export):
    """``flagscale convert mcore-to-hf`` of a Megatron-LM checkpoint: import it beside
    ``output``, then export that (``export``: :func:`flagscale.convert.mcore_to_hf`'s
    options). Returns the export's result."""
    from flagscale.convert import mcore_to_hf
    from flagscale.errors import ConversionError

    spec = export.get("tokenizer") or getattr(open_megatron_lm(input).args, "tokenizer_model",
                                              None)
    if not spec or not Path(spec).exists():
        raise ConversionError(f"{input}: the tokenizer its Megatron-LM args name ({spec}) is not "
                              f"here to export; pass --tokenizer (a sentencepiece .model or a "
                              f"Hugging Face tokenizer).")
    with _imported(input, output, None, log) as imported:
        return mcore_to_hf(imported, output, **export)


@contextlib.contextmanager
def _imported(input, output, platform, log) -> Iterator[Path]:
    """The imported checkpoint, in a hidden directory beside ``output`` removed afterwards
    whatever happens."""
    from flagscale.checkpoint.output import check_output_location

    output = Path(output).absolute()
    check_output_location(output, [input])
    work = output.parent / f".{output.name}.megatron-lm"
    if work.exists():  # left by a conversion that was killed
        shutil.rmtree(work)
    try:
        yield import_megatron_lm(input, work, platform, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# torch_dist's checkpoint writer starts a spawn-based multiprocessing Manager, which re-imports
# this module: the work must stay under the guard.
if __name__ == "__main__":
    sys.exit(main())
