"""Read Megatron-LM checkpoints: find them, check them, and translate their arguments into a
flagscale config.

    ckpt = open_megatron_lm("megatron_ckpts/llama3_8b")       # the dir holding the tracker file
    ckpt.describe(), ckpt.dims, ckpt.iteration
    cfg = flagscale_config(ckpt, vocab_size=128256)            # a flagscale config dict

Two formats, both found through ``latest_checkpointed_iteration.txt`` (an iteration number or
``release``) beside their ``iter_XXXXXXX`` directories, or given as an iteration directory:

- ``legacy`` (``--ckpt-format torch``): ``mp_rank_TT[_PPP]/model_optim_rng.pt`` per (tp, pp)
  rank, a dict with ``args`` (the run's argparse Namespace), ``iteration``, ``model`` (``model0``,
  ``model1``... with virtual stages), ``optimizer``, ``opt_param_scheduler``, ``rng_state``; and
  beside it ``distrib_optim.pt``, the distributed optimizer's flat fp32 buffers written by
  megatron-core's ``DistributedOptimizer.save_parameter_state``.
- ``torch_dist``: a megatron-core distributed checkpoint whose common state holds ``args``,
  ``iteration`` and ``opt_param_scheduler`` (Megatron-LM's ``pretrain_gpt.py``).

Megatron-LM's LR schedule counts samples (``training.py`` steps it by the global batch size
every iteration), flagscale's counts iterations: :func:`flagscale_config` and
:attr:`MegatronLMCheckpoint.scheduler_iterations` divide by the global batch size.

Everything here reads metadata only (the rank-0 file is memory-mapped, never read whole), so every
refusal comes before any output is written. Converting the tensors needs the engine:
:mod:`flagscale.train.megatron_lm_import`.
"""

from __future__ import annotations

import zipfile
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from flagscale.config import ParallelDims, padded_vocab_size
from flagscale.errors import CheckpointError, ConfigError

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
OPTIMIZER_FILE = "distrib_optim.pt"
LEGACY, TORCH_DIST = "legacy", "torch_dist"


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    """Megatron-LM's name for a (tp, pp) rank's directory: ``mp_rank_TT``, with ``_PPP`` only
    when the run had pipeline parallelism."""
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")


@dataclass(frozen=True)
class MegatronLMCheckpoint:
    """One iteration of a Megatron-LM checkpoint, checked complete (:func:`open_megatron_lm`)."""

    path: Path
    """The iteration directory (``iter_XXXXXXX`` or ``release``)."""
    format: str
    """:data:`LEGACY` or :data:`TORCH_DIST`."""
    iteration: int
    args: Namespace
    """The arguments of the Megatron-LM run that saved it."""
    scheduler: dict
    """Its ``opt_param_scheduler`` state (steps counted in samples)."""
    dims: ParallelDims
    """The layout it was saved at."""

    def rank_dir(self, tp_rank: int, pp_rank: int) -> Path:
        return self.path / rank_dir_name(tp_rank, pp_rank, self.dims.pp)

    @property
    def global_batch_size(self) -> int:
        return int(self.args.global_batch_size)

    @property
    def scheduler_iterations(self) -> float:
        """Where its LR schedule stands, in iterations of the final global batch size (a
        fraction after a batch-size ramp-up, whose early iterations were smaller)."""
        return float(self.scheduler.get("num_steps", 0)) / self.global_batch_size

    @property
    def consumed_samples(self) -> int:
        return int(getattr(self.args, "consumed_train_samples", 0) or 0)

    def describe(self) -> str:
        """One line: what was found."""
        what = ("legacy (--ckpt-format torch, mp_rank_* with distrib_optim.pt)"
                if self.format == LEGACY else "torch_dist")
        return (f"Megatron-LM {what} checkpoint {self.path}, iteration {self.iteration}, saved "
                f"at {self.dims.describe()}")


def find_megatron_lm(path: str | Path) -> Optional[Path]:
    """The iteration directory when ``path`` is a Megatron-LM checkpoint (its root holding
    ``latest_checkpointed_iteration.txt`` or one iteration directory), else None. Reads no
    tensors; a flagscale checkpoint is never taken for one."""
    path = Path(path)
    if (path / TRACKER).is_file():
        return _tracked_iteration(path)
    if not path.is_dir():
        return None
    if any(path.glob(f"mp_rank_*/{MODEL_FILE}")):
        return path
    if (path / "metadata.json").is_file() and (path / "common.pt").is_file() and \
            not (path / "flagscale_config.yaml").is_file():
        common = _common_state(path)
        if "args" in common and "flagscale" not in common:
            return path
    return None


def _tracked_iteration(root: Path) -> Path:
    tracker = root / TRACKER
    text = tracker.read_text(errors="replace").strip()
    if text == "release":
        iteration = root / "release"
    elif text.isdigit():
        iteration = root / f"iter_{int(text):07d}"
    else:
        raise CheckpointError(f"{tracker} holds {text[:40]!r}, not an iteration number or "
                              f"'release'. Write the iteration to load into it, or pass its "
                              f"iter_XXXXXXX directory.")
    if not iteration.is_dir():
        raise CheckpointError(f"{tracker} names {iteration.name}, but {iteration} does not "
                              f"exist. Restore it, or pass another iter_XXXXXXX directory.")
    return iteration


def _common_state(path: Path) -> dict:
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load_common_state_dict(str(path))
    except Exception as exc:  # a missing or foreign common.pt surfaces in many types
        raise CheckpointError(f"{path}: cannot read the checkpoint's common state ({exc}).") \
            from None


def _zip_problem(file: Path) -> Optional[str]:
    """What keeps ``file`` (a torch.save zip archive) from being whole, or None. A file cut
    short loses the archive's closing directory; one cut inside a record ends before it."""
    if not file.is_file():
        return f"{file} is missing"
    size = file.stat().st_size
    try:
        with zipfile.ZipFile(file) as archive:
            short = next((info.filename for info in archive.infolist()
                          if info.header_offset + info.compress_size > size), None)
    except (zipfile.BadZipFile, OSError) as exc:
        return f"{file} is truncated or not a torch.save file ({size} bytes; {exc})"
    return f"{file} is truncated (record {short} ends past its {size} bytes)" if short else None


def _load_rank_file(file: Path) -> dict:
    # Megatron-LM pickles an argparse Namespace, numpy and python RNG states into this file, so
    # it cannot load with weights_only; mmap reads only the pages touched (args, scheduler).
    return torch.load(file, map_location="cpu", weights_only=False, mmap=True)


def open_megatron_lm(path: str | Path) -> MegatronLMCheckpoint:
    """Find and check a Megatron-LM checkpoint: every rank's files present and whole
    (CheckpointError naming the first that is not), its arguments readable."""
    iteration_dir = find_megatron_lm(path)
    if iteration_dir is None:
        raise CheckpointError(f"{path} is not a Megatron-LM checkpoint: no {TRACKER}, no "
                              f"mp_rank_*/{MODEL_FILE} and no torch_dist common state with "
                              f"'args' in it.")
    if any(iteration_dir.glob(f"mp_rank_*/{MODEL_FILE}")) or not (
            iteration_dir / "metadata.json").is_file():
        return _open_legacy(iteration_dir)
    return _open_torch_dist(iteration_dir)


def _dims(args: Namespace, where: Path) -> ParallelDims:
    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    pp = int(getattr(args, "pipeline_model_parallel_size", 1) or 1)
    cp = int(getattr(args, "context_parallel_size", 1) or 1)
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    world = int(getattr(args, "world_size", 0) or 0)
    dp = int(getattr(args, "data_parallel_size", 0) or 0) or max(1, world // (tp * pp * cp))
    if int(getattr(args, "expert_model_parallel_size", 1) or 1) > 1:
        raise CheckpointError(f"{where}: saved with expert parallelism "
                              f"(expert_model_parallel_size={args.expert_model_parallel_size}); "
                              f"flagscale trains dense Llama-family models only.")
    return ParallelDims(tp=tp, pp=pp, cp=cp, dp=dp, vpp=int(vpp) if vpp else None)


def _open_legacy(iteration_dir: Path) -> MegatronLMCheckpoint:
    first = next(iter(sorted(iteration_dir.glob(f"mp_rank_*/{MODEL_FILE}"))), None)
    if first is None:
        raise CheckpointError(f"{iteration_dir} holds no mp_rank_*/{MODEL_FILE}: the "
                              f"checkpoint is empty or was not written by Megatron-LM.")
    problem = _zip_problem(first)
    if problem:
        raise CheckpointError(f"Megatron-LM checkpoint {iteration_dir} is incomplete: "
                              f"{problem}. Restore that file or load another iteration.")
    state = _load_rank_file(first)
    if not isinstance(state, dict) or not isinstance(state.get("args"), Namespace):
        raise CheckpointError(f"{first} holds no Megatron-LM 'args' Namespace: it was not "
                              f"written by Megatron-LM's checkpointing.py.")
    args = state["args"]
    dims = _dims(args, iteration_dir)
    if not getattr(args, "use_distributed_optimizer", False):
        raise CheckpointError(
            f"{iteration_dir} was saved without --use-distributed-optimizer: its optimizer state "
            f"is inside {MODEL_FILE} in Megatron-LM's non-distributed layout, which flagscale "
            f"does not read. Resave it from Megatron-LM with --use-distributed-optimizer.")
    problems = [problem for tp_rank in range(dims.tp) for pp_rank in range(dims.pp)
                for name in (MODEL_FILE, OPTIMIZER_FILE)
                if (problem := _zip_problem(iteration_dir
                                            / rank_dir_name(tp_rank, pp_rank, dims.pp) / name))]
    if problems:
        raise CheckpointError(
            f"Megatron-LM checkpoint {iteration_dir} (tp={dims.tp} pp={dims.pp}) is incomplete: "
            f"{'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}. Every (tp, pp) "
            f"rank needs {MODEL_FILE} and {OPTIMIZER_FILE}; restore them or load another "
            f"iteration.")
    return MegatronLMCheckpoint(iteration_dir, LEGACY, int(state.get("iteration", 0)), args,
                                dict(state.get("opt_param_scheduler") or {}), dims)


def _open_torch_dist(iteration_dir: Path) -> MegatronLMCheckpoint:
    from flagscale.checkpoint.paths import checkpoint_problem

    problem = checkpoint_problem(iteration_dir, flagscale_files=False)
    if problem:
        raise CheckpointError(f"Megatron-LM checkpoint {iteration_dir} is incomplete: "
                              f"{problem}. Restore that file or load another iteration.")
    common = _common_state(iteration_dir)
    args = common.get("args")
    if not isinstance(args, Namespace):
        raise CheckpointError(f"{iteration_dir}: its common state holds no Megatron-LM 'args' "
                              f"Namespace.")
    if "optimizer" not in common:
        raise CheckpointError(f"{iteration_dir} holds no optimizer state (saved with "
                              f"--no-save-optim?); flagscale reshard converts checkpoints to "
                              f"train on, with their optimizer.")
    return MegatronLMCheckpoint(iteration_dir, TORCH_DIST, int(common.get("iteration", 0)), args,
                                dict(common.get("opt_param_scheduler") or {}),
                                _dims(args, iteration_dir))


# ---- arguments -> flagscale config -------------------------------------------------------------

_LLAMA_ARGS = (
    # (argument, what a Llama-family model has, Megatron-LM's default)
    ("normalization", "RMSNorm", "LayerNorm"),
    ("swiglu", True, False),
    ("position_embedding_type", "rope", "learned_absolute"),
    ("add_bias_linear", False, True),
    ("num_experts", None, None),
    ("qk_layernorm", False, False),
    ("rotary_percent", 1.0, 1.0),
    ("rotary_interleaved", False, False),
    ("apply_layernorm_1p", False, False),
    ("multi_latent_attention", False, False),
    ("window_size", None, None),
    ("squared_relu", False, False),
    ("fp16", False, False),
)


def _arg(args: Namespace, name: str, default=None):
    value = getattr(args, name, default)
    return default if value is None else value


def llama_family_problems(args: Namespace) -> list[str]:
    """The arguments that make the saved model something other than a Llama-family model
    (RMSNorm, SwiGLU, RoPE, no linear biases except Qwen2's q/k/v): ``name=value (needs X)``."""
    problems = [f"{name}={getattr(args, name, default)!r} (needs {need!r})"
                for name, need, default in _LLAMA_ARGS
                if getattr(args, name, default) != need]
    heads, hidden = int(args.num_attention_heads), int(args.hidden_size)
    kv = getattr(args, "kv_channels", None)
    if kv not in (None, hidden // heads):
        problems.append(f"kv_channels={kv} (needs hidden_size / num_attention_heads = "
                        f"{hidden // heads})")
    return problems


def flagscale_config(ckpt: MegatronLMCheckpoint, vocab_size: Optional[int] = None,
                     log=print) -> dict:
    """The flagscale config (a dict for :func:`flagscale.config.load_config`) of the model,
    layout, batch and schedule the checkpoint was trained with.

    ``vocab_size`` is the tokenizer's true size when the arguments do not record it (Megatron-LM
    stores only the padded size, unless ``--vocab-size`` was given); without either the padded
    size is kept (the padding rows become ordinary rows). A model outside the Llama family
    raises CheckpointError listing every argument that says so."""
    args, where = ckpt.args, ckpt.path
    problems = llama_family_problems(args)
    if problems:
        raise CheckpointError(
            f"{where} holds a model flagscale does not train: {'; '.join(problems)}. flagscale "
            f"converts Llama-family Megatron-LM models (--normalization RMSNorm --swiglu "
            f"--position-embedding-type rope --disable-bias-linear).")
    padded = int(_arg(args, "padded_vocab_size", 0))
    divisible = int(_arg(args, "make_vocab_size_divisible_by", 128))
    vocab = int(_arg(args, "vocab_size", 0)) or vocab_size
    if vocab is None:
        log(f"flagscale: {where} records only the padded vocabulary ({padded} rows) and no "
            f"tokenizer flagscale can read; keeping all {padded} rows as the vocabulary")
        vocab = padded
    if padded and padded_vocab_size(vocab, divisible, ckpt.dims.tp) != padded:
        raise CheckpointError(
            f"{where}: a vocabulary of {vocab} tokens pads to "
            f"{padded_vocab_size(vocab, divisible, ckpt.dims.tp)} rows at tp={ckpt.dims.tp} "
            f"(make_vocab_size_divisible_by={divisible}), but the checkpoint has {padded}. The "
            f"tokenizer named by its args (tokenizer_model={getattr(args, 'tokenizer_model', None)}"
            f") is not the one it trained with.")
    tokenizer = getattr(args, "tokenizer_model", None)
    return {"model": _model_section(args, vocab), "parallel": _parallel_section(ckpt),
            "train": _train_section(ckpt, log),
            "data": {"tokenizer": tokenizer if tokenizer and Path(tokenizer).exists() else None}}


def _model_section(args: Namespace, vocab: int) -> dict:
    gqa = bool(getattr(args, "group_query_attention", False))
    seq = int(args.seq_length)
    return {"family": "qwen2" if getattr(args, "add_qkv_bias", False) else "llama",
            "num_layers": int(args.num_layers), "hidden_size": int(args.hidden_size),
            "num_attention_heads": int(args.num_attention_heads),
            "num_query_groups": int(args.num_query_groups) if gqa else None,
            "ffn_hidden_size": int(_arg(args, "ffn_hidden_size", 4 * int(args.hidden_size))),
            "vocab_size": vocab,
            "max_position_embeddings": int(_arg(args, "max_position_embeddings", seq)),
            "rope_theta": float(_arg(args, "rotary_base", 10000)),
            "rope_scaling_factor": (float(_arg(args, "rope_scaling_factor", 8.0))
                                    if getattr(args, "use_rope_scaling", False) else None),
            "norm_epsilon": float(_arg(args, "norm_epsilon", 1e-5)),
            "qkv_bias": bool(getattr(args, "add_qkv_bias", False)),
            "tie_word_embeddings": not getattr(args, "untie_embeddings_and_output_weights", False),
            "init_method_std": float(_arg(args, "init_method_std", 0.02)),
            "params_dtype": "bf16" if getattr(args, "bf16", False) else "fp32",
            "make_vocab_size_divisible_by": int(_arg(args, "make_vocab_size_divisible_by", 128))}


def _parallel_section(ckpt: MegatronLMCheckpoint) -> dict:
    args, d = ckpt.args, ckpt.dims
    return {"tp": d.tp, "pp": d.pp, "cp": d.cp, "dp": d.dp, "vpp": d.vpp,
            "sequence_parallel": bool(getattr(args, "sequence_parallel", False)),
            "distributed_optimizer": True,
            "num_layers_in_first_pipeline_stage": getattr(args, "decoder_first_pipeline_num_layers",
                                                          None),
            "num_layers_in_last_pipeline_stage": getattr(args, "decoder_last_pipeline_num_layers",
                                                         None),
            "account_for_embedding_in_pipeline_split": bool(
                getattr(args, "account_for_embedding_in_pipeline_split", False)),
            "account_for_loss_in_pipeline_split": bool(
                getattr(args, "account_for_loss_in_pipeline_split", False))}


def ddp_layout_overrides(ckpt: MegatronLMCheckpoint) -> dict:
    """The ``parallel`` settings that decide how the DDP buffers, hence ``distrib_optim.pt``'s
    flat tensors, are laid out: the same bucket size (megatron-core's default depends on the DP
    size, Megatron-LM's run had its own) and whether buckets were split at all (only with
    overlapped gradient reduction)."""
    args = ckpt.args
    bucket = getattr(args, "ddp_bucket_size", None) or max(40_000_000,
                                                           1_000_000 * ckpt.dims.dp * ckpt.dims.cp)
    return {"overlap_grad_reduce": bool(getattr(args, "overlap_grad_reduce", False)),
            "ddp_bucket_size": int(bucket)}


def _train_section(ckpt: MegatronLMCheckpoint, log) -> dict:
    args, sched, gbs = ckpt.args, ckpt.scheduler, ckpt.global_batch_size
    if getattr(args, "rampup_batch_size", None):
        log(f"flagscale: {ckpt.path} ramped its batch size up ({args.rampup_batch_size}); its "
            f"LR schedule continues at sample {sched.get('num_steps')}, iteration "
            f"{ckpt.scheduler_iterations:g} of global batch {gbs}")
    start_wd = sched.get("start_wd", _arg(args, "start_weight_decay", args.weight_decay))
    end_wd = sched.get("end_wd", _arg(args, "end_weight_decay", args.weight_decay))
    if start_wd != end_wd:
        raise ConfigError(f"{ckpt.path}: weight decay went from {start_wd} to {end_wd} "
                          f"(--weight-decay-incr-style); flagscale holds it constant.")
    train_iters = getattr(args, "train_iters", None) or \
        int(getattr(args, "train_samples", 0) or 0) // gbs
    warmup = float(sched.get("lr_warmup_steps", 0)) / gbs
    decay = float(sched.get("lr_decay_steps", train_iters * gbs)) / gbs
    if warmup != round(warmup) or decay != round(decay):
        log(f"flagscale: {ckpt.path}'s LR warmup ({sched.get('lr_warmup_steps')} samples) and "
            f"decay ({sched.get('lr_decay_steps')} samples) are not whole iterations of global "
            f"batch {gbs}; rounded to {round(warmup)} and {round(decay)} iterations")
    return {"micro_batch_size": int(args.micro_batch_size), "global_batch_size": gbs,
            "seq_length": int(args.seq_length), "iterations": int(train_iters),
            "seed": int(_arg(args, "seed", 1234)),
            "lr": float(sched.get("max_lr", args.lr)),
            "min_lr": float(sched.get("min_lr", _arg(args, "min_lr", 0.0))),
            "warmup_iterations": round(warmup), "lr_decay_iterations": round(decay),
            "lr_decay_style": sched.get("lr_decay_style", _arg(args, "lr_decay_style", "linear")),
            "weight_decay": float(start_wd),
            "adam_beta1": float(_arg(args, "adam_beta1", 0.9)),
            "adam_beta2": float(_arg(args, "adam_beta2", 0.999)),
            "adam_eps": float(_arg(args, "adam_eps", 1e-8)),
            "clip_grad": float(_arg(args, "clip_grad", 1.0))}
