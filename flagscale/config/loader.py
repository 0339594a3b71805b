"""Load a run config from YAML plus dotted overrides, and validate it before any work starts.

    cfg = load_config("examples/tiny/config.yaml", ["parallel.tp=2", "train.iterations=20"])
    layout = validate(cfg, world_size=2)

Errors name the key, the bad value and the arithmetic, and suggest the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from flagscale.config.parallel_dims import ParallelDims
from flagscale.config.presets import MODEL_PRESETS
from flagscale.config.schema import Config, Layout
from flagscale.errors import ConfigError


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key the config accepts (``model.hidden_size``, ``parallel.tp``, ...)."""
    keys = []
    for name, tp in _fields(cls).items():
        if _is_dataclass_type(tp):
            keys += all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else " Run `flagscale train --keys` for the list."
    return ConfigError(f"Unknown config key '{key}' ({where}).{hint}")


def _coerce(key: str, value: Any, tp: Any, where: str) -> Any:
    """Accept YAML's loose scalars (``3e-4`` is a string in YAML 1.1) but reject real mismatches."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        tp = args[0]
    if tp is Any or value is None and tp is not bool:
        return value
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if tp is list or typing.get_origin(tp) is list:
            return list(value) if isinstance(value, (list, tuple)) else [value]
    except (TypeError, ValueError):
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"Config key '{key}' ({where}) must be {name}, got {value!r}.") from None
    return value


def _build(cls, raw: dict, prefix: str, where: str):
    kwargs = {}
    fields = _fields(cls)
    for name, value in raw.items():
        key = prefix + name
        if name not in fields:
            raise _unknown_key(key, where)
        tp = fields[name]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"Config key '{key}' ({where}) must be a mapping of its "
                                  f"fields, got {value!r}.")
            kwargs[name] = _build(tp, value, key + ".", where)
        else:
            kwargs[name] = _coerce(key, value, tp, where)
    return cls(**kwargs)


def _set_dotted(raw: dict, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise _unknown_key(key, where)
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """``["parallel.tp=2", "data.paths=[a,b]"]`` -> ``[("parallel.tp", 2), ("data.paths", ["a","b"])]``."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' is not of the form key=value "
                              f"(e.g. parallel.tp=2).")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"Override '{item}': the value is not valid YAML ({exc}).") from None
        parsed.append((key.strip(), value))
    return parsed


def load_config(path: Optional[str | os.PathLike] = None, overrides: Iterable[str] = (),
                base: Optional[dict] = None) -> Config:
    """Read ``path`` (YAML), apply dotted ``overrides`` and fill the model from its preset."""
    raw: dict = dict(base or {})
    where = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist. Pass a YAML file such as "
                              f"examples/tiny/config.yaml.")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file {path} must hold a mapping at the top level.")
        raw.update(loaded)
        where = str(path)
    for key, value in parse_overrides(overrides):
        if key not in all_keys():
            raise _unknown_key(key, "command-line override")
        _set_dotted(raw, key, value, "command-line override")
    model = raw.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"Config key 'model' ({where}) must be a mapping.")
    preset = model.get("preset")
    if preset is not None:
        if preset not in MODEL_PRESETS:
            close = difflib.get_close_matches(str(preset), MODEL_PRESETS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"model.preset '{preset}' ({where}) is not a known preset.{hint} "
                              f"Known: {', '.join(sorted(MODEL_PRESETS))}.")
        raw["model"] = {**MODEL_PRESETS[preset], **model}
    return _build(Config, raw, "", where)


def world_size_of(cfg: Config) -> int:
    """Processes the config asks for: tp * pp * cp * (dp or 1)."""
    p = cfg.parallel
    return ParallelDims(tp=p.tp, pp=p.pp, cp=p.cp, dp=p.dp or 1).world_size


def parallel_dims(cfg: Config, world_size: int) -> ParallelDims:
    """The config's parallel degrees on ``world_size`` processes (``parallel.dp`` derived when
    unset); ConfigError with the arithmetic when they do not multiply to the world size."""
    p = cfg.parallel
    for key, value in (("parallel.tp", p.tp), ("parallel.pp", p.pp), ("parallel.cp", p.cp)):
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}.")
    if p.dp is not None and p.dp < 1:
        raise ConfigError(f"parallel.dp must be at least 1 (or unset), got {p.dp}.")
    if p.vpp is not None and p.vpp < 1:
        raise ConfigError(f"parallel.vpp must be at least 1 (or unset), got {p.vpp}.")
    return ParallelDims.from_world(world_size, tp=p.tp, pp=p.pp, cp=p.cp, dp=p.dp, vpp=p.vpp)


def split_fractions(split: str) -> tuple[float, float, float]:
    """``data.split`` (``"98,2,0"``; megatron-core also accepts ``/`` between the parts) as
    normalised train/valid/test fractions; ConfigError for anything megatron-core would refuse."""
    try:
        values = [float(part) for part in re.split(r"[,/]", str(split).strip())]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise ConfigError(f"data.split={split!r} must be up to three non-negative "
                          f"train,valid,test proportions with a positive sum, e.g. 98,2,0.")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return values[0] / total, values[1] / total, values[2] / total


def key_docs(cls=Config, prefix: str = "") -> dict[str, str]:
    """``{"parallel.tp": "Tensor-parallel size.", ...}`` from the docstrings under each field."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    body = ast.parse(inspect.getsource(cls)).body[0].body
    hints = _fields(cls)
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) \
                and isinstance(getattr(after, "value", None), ast.Constant):
            name = node.target.id
            if _is_dataclass_type(hints.get(name)):
                docs.update(key_docs(hints[name], f"{prefix}{name}."))
            else:
                docs[prefix + name] = " ".join(str(after.value.value).split())
    return docs


def config_to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (what ``config.yaml`` in the run directory holds)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def data_prefixes(cfg: Config) -> list[tuple[float, str]]:
    """``data.paths`` as ``(weight, prefix)`` pairs; unweighted lists get equal weights."""
    paths = list(cfg.data.paths)
    if not paths:
        return []
    if all(isinstance(p, str) for p in paths):
        return [(1.0, p) for p in paths]
    if len(paths) % 2 == 0 and all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                   and isinstance(p, str) for w, p in zip(paths[::2], paths[1::2])):
        return [(float(w), p) for w, p in zip(paths[::2], paths[1::2])]
    raise ConfigError(f"data.paths must be a list of prefixes [a, b] or weight/prefix pairs "
                      f"[0.7, a, 0.3, b]; got {paths!r}.")


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Vocabulary padded to a multiple of ``divisible_by * tp`` (so every TP shard is equal)."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


CHOICES: dict[str, tuple[str, ...]] = {
    "model.params_dtype": ("fp32", "bf16"),
    "train.lr_decay_style": ("cosine", "linear", "constant"),
    "train.recompute": ("none", "selective", "full"),
    "platform": ("auto", "cuda", "cpu"),
    "train.recompute_method": ("uniform", "block"),
    "model.fp8_recipe": ("tensorwise", "delayed"),
    "parallel.grad_reduce_dtype": ("fp32", "bf16"),
    "parallel.cp_comm_type": ("p2p", "all_gather", "a2a", "a2a+p2p"),
    "trace.on_spike": ("report", "skip", "rewind"),
}
"""The allowed values of the config keys that take one of a few names."""


def validate(cfg: Config, world_size: int, check_paths: bool = True) -> Layout:
    """Check every constraint a worker or megatron-core would hit later, and derive the layout.

    Every section is checked here, so the CLI refuses a bad config before any process starts.
    Raises :class:`ConfigError` naming the key, the value and the arithmetic.
    """
    m, t = cfg.model, cfg.train
    for key, choices in CHOICES.items():
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}.")
    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size"):
        if getattr(m, name) <= 0:
            raise ConfigError(f"model.{name} is {getattr(m, name)}: set model.preset (e.g. tiny, "
                              f"llama3_8b) or give model.{name} explicitly.")
    for key, value in (("train.micro_batch_size", t.micro_batch_size),
                       ("train.global_batch_size", t.global_batch_size),
                       ("train.seq_length", t.seq_length), ("train.iterations", t.iterations),
                       ("train.log_interval", t.log_interval),
                       ("train.eval_iterations", t.eval_iterations)):
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}.")
    _check_values(cfg, world_size)
    dims = parallel_dims(cfg, world_size)
    _check_model_split(cfg, dims)
    per_step = t.micro_batch_size * dims.dp
    if t.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) % (micro_batch_size "
                          f"({t.micro_batch_size}) * dp ({dims.dp})) = "
                          f"{t.global_batch_size % per_step}: choose a global batch that is a "
                          f"multiple of {per_step}.")
    num_micro = t.global_batch_size // per_step
    if dims.vpp and num_micro % dims.pp:
        raise ConfigError(f"microbatches per step ({num_micro} = global_batch_size "
                          f"{t.global_batch_size} / (micro_batch_size {t.micro_batch_size} * dp "
                          f"{dims.dp})) must be a multiple of parallel.pp ({dims.pp}) for the "
                          f"interleaved schedule.")
    _check_rampup(t, dims)
    _check_schedule(cfg)
    _check_sections(cfg)
    _check_performance(cfg, dims)
    if check_paths:
        _check_paths(cfg)
    return Layout(dims=dims, num_microbatches=num_micro,
                  padded_vocab_size=padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by,
                                                      dims.tp),
                  kv_channels=m.hidden_size // m.num_attention_heads,
                  num_query_groups=m.num_query_groups or m.num_attention_heads)


def _check_rampup(t, dims: ParallelDims) -> None:
    """``train.rampup_batch_size``: what megatron-core's microbatch calculator asserts (or divides
    by) when the ramp starts, and every batch of the ramp splitting into whole microbatches."""
    ramp = t.rampup_batch_size
    if ramp is None:
        return
    key = f"train.rampup_batch_size={ramp!r}"
    if (not isinstance(ramp, (list, tuple)) or len(ramp) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in ramp)):
        raise ConfigError(f"{key}: expected three integers [start, increment, samples] (e.g. "
                          f"[32, 32, 2000000]: start at 32 sequences, add 32 at a time over the "
                          f"first 2,000,000 samples), or null for no ramp-up.")
    start, increment, samples = ramp
    if start < 1 or increment < 1 or samples < 1:
        raise ConfigError(f"{key}: start ({start}), increment ({increment}) and samples "
                          f"({samples}) must each be at least 1 (megatron-core's calculator "
                          f"divides samples by the number of increments); set null for no "
                          f"ramp-up.")
    if start >= t.global_batch_size:
        raise ConfigError(f"{key}: start ({start}) must be below train.global_batch_size "
                          f"({t.global_batch_size}), the size the ramp ends at (start == global "
                          f"is no ramp: set train.rampup_batch_size=null).")
    if (t.global_batch_size - start) % increment:
        raise ConfigError(f"{key}: (global_batch_size {t.global_batch_size} - start {start}) % "
                          f"increment {increment} = {(t.global_batch_size - start) % increment}: "
                          f"the ramp must reach the global batch in whole increments; choose an "
                          f"increment dividing {t.global_batch_size - start}.")
    per_step = t.micro_batch_size * dims.dp
    for name, value in (("start", start), ("increment", increment)):
        if value % per_step:
            raise ConfigError(f"{key}: {name} ({value}) % (micro_batch_size "
                              f"({t.micro_batch_size}) * dp ({dims.dp})) = {value % per_step}: "
                              f"every batch of the ramp must split into whole microbatches; "
                              f"choose a {name} that is a multiple of {per_step}.")
        if dims.vpp and (value // per_step) % dims.pp:
            raise ConfigError(f"{key}: {name} ({value}) is {value // per_step} microbatches per "
                              f"data-parallel rank (/ (micro_batch_size {t.micro_batch_size} * "
                              f"dp {dims.dp})), not a multiple of parallel.pp ({dims.pp}) as the "
                              f"interleaved schedule needs in every step; choose a multiple of "
                              f"{per_step * dims.pp}.")


def _check_values(cfg: Config, world_size: int) -> None:
    """Values that no arithmetic between keys would catch, but that crash the workers or train
    something other than asked (each was once accepted here and failed late)."""
    m, t = cfg.model, cfg.train
    if world_size < 1:
        raise ConfigError(f"The run needs at least 1 process, got a world size of {world_size} "
                          f"(--nproc, or tp * pp * cp * dp of the config). Pass --nproc N with "
                          f"N >= 1, or leave it out to use the config's.")
    if m.num_query_groups is not None and m.num_query_groups < 1:
        raise ConfigError(f"model.num_query_groups must be at least 1 (key/value heads), or unset "
                          f"for one per query head; got {m.num_query_groups}.")
    if m.max_position_embeddings < 1:
        raise ConfigError(f"model.max_position_embeddings must be at least 1, got "
                          f"{m.max_position_embeddings}.")
    if t.seq_length > m.max_position_embeddings:
        raise ConfigError(f"train.seq_length ({t.seq_length}) > model.max_position_embeddings "
                          f"({m.max_position_embeddings}): the model would train on positions "
                          f"beyond its context. Lower train.seq_length, or raise "
                          f"model.max_position_embeddings to extend the context on purpose.")
    if t.lr < 0 or t.final_lr < 0 or t.final_lr > t.lr:
        raise ConfigError(f"train.lr ({t.lr}) and train.min_lr ({t.final_lr}) must satisfy "
                          f"0 <= min_lr <= lr: the schedule warms up to lr and decays to min_lr.")


def _check_model_split(cfg: Config, dims: ParallelDims) -> None:
    """The model divides evenly over the tensor, pipeline and context-parallel ranks."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    groups = m.num_query_groups or m.num_attention_heads
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.hidden_size ({m.hidden_size}) % model.num_attention_heads "
                          f"({m.num_attention_heads}) = {m.hidden_size % m.num_attention_heads}, "
                          f"must be 0.")
    if m.num_attention_heads % groups:
        raise ConfigError(f"model.num_attention_heads ({m.num_attention_heads}) % "
                          f"model.num_query_groups ({groups}) != 0.")
    if m.num_attention_heads % dims.tp:
        raise ConfigError(f"model.num_attention_heads ({m.num_attention_heads}) % parallel.tp "
                          f"({dims.tp}) = {m.num_attention_heads % dims.tp}: choose a tp that "
                          f"divides the head count.")
    if groups % dims.tp:
        raise ConfigError(f"model.num_query_groups ({groups}) % parallel.tp ({dims.tp}) = "
                          f"{groups % dims.tp}: each TP rank needs whole key/value groups.")
    if m.ffn_hidden_size % dims.tp:
        raise ConfigError(f"model.ffn_hidden_size ({m.ffn_hidden_size}) % parallel.tp ({dims.tp}) "
                          f"!= 0.")
    pipeline_split(cfg, dims)
    if dims.vpp and dims.pp < 2:
        raise ConfigError(f"parallel.vpp={dims.vpp} needs parallel.pp >= 2 (interleaved pipeline "
                          f"schedule); got pp={dims.pp}.")
    if p.sequence_parallel and dims.tp < 2:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp >= 2; set it false "
                          "or raise tp.")
    if p.sequence_parallel and t.seq_length % dims.tp:
        raise ConfigError(f"train.seq_length ({t.seq_length}) % parallel.tp ({dims.tp}) != 0, "
                          f"needed by sequence parallelism.")
    if dims.cp > 1 and t.seq_length % (2 * dims.cp * dims.tp):
        raise ConfigError(f"train.seq_length ({t.seq_length}) % (2 * parallel.cp ({dims.cp}) * "
                          f"parallel.tp ({dims.tp})) = {t.seq_length % (2 * dims.cp * dims.tp)}: "
                          f"context parallelism splits each sequence into 2*cp chunks (two per "
                          f"rank, balancing the causal mask), each divisible by tp. Use a "
                          f"sequence length that is a multiple of {2 * dims.cp * dims.tp}.")


def _check_schedule(cfg: Config) -> None:
    """Intervals, the LR schedule, and evaluation against the data split."""
    t, c = cfg.train, cfg.checkpoint
    for key, value in (("train.eval_interval", t.eval_interval),
                       ("checkpoint.save_interval", c.save_interval)):
        if value < 0:
            raise ConfigError(f"{key} must be >= 0 (0 disables it), got {value}.")
    if t.warmup_iterations < 0 or (t.lr_decay_iterations is not None and t.lr_decay_iterations < 1):
        raise ConfigError("train.warmup_iterations must be >= 0 and train.lr_decay_iterations >= 1.")
    if t.stop_iteration is not None and not 1 <= t.stop_iteration <= t.iterations:
        raise ConfigError(f"train.stop_iteration ({t.stop_iteration}) must lie in 1..train."
                          f"iterations ({t.iterations}), or be unset.")
    if c.keep_last is not None and c.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last must be at least 1 (or unset to keep every "
                          f"checkpoint), got {c.keep_last}.")
    train_part, valid_part, _ = split_fractions(cfg.data.split)
    if train_part == 0:
        raise ConfigError(f"data.split={cfg.data.split!r} gives the train split 0 of the "
                          f"documents: nothing to train on. Give it a positive first part, "
                          f"e.g. data.split=98,2,0.")
    if t.eval_interval and valid_part == 0:
        raise ConfigError(f"train.eval_interval={t.eval_interval} evaluates on the validation "
                          f"split, but data.split={cfg.data.split!r} gives it "
                          f"{valid_part:.0%} of the documents (its second part is 0). Give the "
                          f"validation split a share (e.g. data.split=98,2,0) or set "
                          f"train.eval_interval=0.")
    bad = [k for k in cfg.data.skip_iterations
           if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= t.iterations]
    if bad:
        raise ConfigError(f"data.skip_iterations {bad} are not iterations of the run: give "
                          f"1-based iterations within 1..train.iterations ({t.iterations}).")


def _check_sections(cfg: Config) -> None:
    """The trace and metrics sections (read only inside the workers, so checked here)."""
    tr, me = cfg.trace, cfg.metrics
    if tr.spike_factor <= 0:
        raise ConfigError(f"trace.spike_factor ({tr.spike_factor}) must be > 0: a spike is a loss "
                          f"above spike_factor times the median of recent losses (1.5 is the "
                          f"default; a factor <= 1 reports ordinary steps, which tests use).")
    if tr.window < 1:
        raise ConfigError(f"trace.window ({tr.window}) must be at least 1: it is the number of "
                          f"recent losses whose median is the spike reference (50 is the "
                          f"default).")
    for key, value in (("trace.text_chars", tr.text_chars), ("trace.max_reports", tr.max_reports),
                       ("trace.max_rewinds", tr.max_rewinds),
                       ("trace.rewind_skip_around", tr.rewind_skip_around)):
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}.")
    if tr.on_spike != "report" and not tr.enabled:
        raise ConfigError(f"trace.on_spike={tr.on_spike} acts on the spikes the trace callback "
                          f"detects, but trace.enabled is false. Set trace.enabled=true or "
                          f"trace.on_spike=report.")
    if tr.on_spike == "rewind" and not cfg.checkpoint.save_interval:
        raise ConfigError("trace.on_spike=rewind reloads the newest checkpoint at a spike, but "
                          "checkpoint.save_interval is 0 (no checkpoints are saved). Set "
                          "checkpoint.save_interval (e.g. 100) or trace.on_spike=skip/report.")
    if me.peak_tflops is not None and me.peak_tflops <= 0:
        raise ConfigError(f"metrics.peak_tflops must be positive (dense TFLOP/s of one device), "
                          f"got {me.peak_tflops}.")
    if me.wandb and not me.wandb_project:
        raise ConfigError("metrics.wandb=true needs a metrics.wandb_project name.")
    if cfg.launch.signal_seconds < 0:
        raise ConfigError(f"launch.signal_seconds ({cfg.launch.signal_seconds}) must be >= 0: "
                          f"the seconds before the Slurm time limit at which the run is told to "
                          f"save and requeue (0 turns the warning off).")


def _check_paths(cfg: Config) -> None:
    prefixes = data_prefixes(cfg)
    if not prefixes:
        raise ConfigError("data.paths is empty: give the dataset prefixes written by "
                          "`flagscale preprocess` (e.g. data.paths=[data/corpus_text]).")
    for _, prefix in prefixes:
        missing = [s for s in (".bin", ".idx") if not Path(prefix + s).is_file()]
        if missing:
            raise ConfigError(f"data.paths: dataset prefix '{prefix}' has no "
                              f"{' or '.join(prefix + s for s in missing)} (cwd {os.getcwd()}). "
                              f"Run `flagscale preprocess --output-prefix {prefix} ...` or fix "
                              f"the path.")
    if cfg.data.tokenizer and not Path(cfg.data.tokenizer).exists():
        raise ConfigError(f"data.tokenizer: '{cfg.data.tokenizer}' does not exist (cwd "
                          f"{os.getcwd()}).")
    load = cfg.checkpoint.load
    if load and load != "auto" and not Path(load).is_dir():
        raise ConfigError(f"checkpoint.load: '{load}' is not a directory. Give a checkpoint "
                          f"directory, 'auto', or leave it empty to start fresh.")


def pipeline_split(cfg: Config, dims: ParallelDims) -> tuple[int, ...]:
    """Transformer layers held by each pipeline rank, first to last, as megatron-core 0.16.1 splits
    them (``TransformerConfig`` / ``get_num_layers_to_build``): evenly, or with the first/last
    stage sizes given (``parallel.num_layers_in_first/last_pipeline_stage``, the others even), or
    with the embedding and/or the loss counted as one layer of the first/last stage. Raises
    :class:`ConfigError` with the arithmetic when the layers do not split that way."""
    m, p = cfg.model, cfg.parallel
    layers, pp, vpp = m.num_layers, dims.pp, dims.vpp or 1
    first, last = p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage
    embedding, loss = p.account_for_embedding_in_pipeline_split, p.account_for_loss_in_pipeline_split
    vpp_note = f" * parallel.vpp ({vpp})" if vpp > 1 else ""
    if (first is not None or last is not None) and (embedding or loss):
        raise ConfigError("parallel.num_layers_in_first/last_pipeline_stage and parallel."
                          "account_for_embedding/loss_in_pipeline_split are two ways to split "
                          "layers unevenly; megatron-core accepts only one. Set one of them.")
    if (first is not None or last is not None or embedding or loss) and pp < 2:
        raise ConfigError(f"An uneven pipeline split needs parallel.pp >= 2, got pp={pp}. Drop "
                          f"parallel.num_layers_in_*_pipeline_stage / account_for_*.")
    if first is not None or last is not None:
        ends = {"first": first, "last": last}
        for name, value in ends.items():
            if value is not None and (value < 1 or value % vpp):
                raise ConfigError(f"parallel.num_layers_in_{name}_pipeline_stage ({value}) must be "
                                  f"a positive multiple of parallel.vpp ({vpp}): each virtual "
                                  f"stage of the {name} pipeline rank holds whole layers.")
        middle_stages = pp - sum(v is not None for v in ends.values())
        middle = layers - (first or 0) - (last or 0)
        arithmetic = (f"model.num_layers ({layers}) - first ({first or 0}) - last ({last or 0}) = "
                      f"{middle} layers over {middle_stages} middle stage(s)")
        if (middle > 0) != (middle_stages > 0) or middle < 0 or (
                middle_stages and middle % (middle_stages * vpp)):
            raise ConfigError(f"Uneven pipeline split: {arithmetic}; they must split evenly "
                              f"(a multiple of {middle_stages or 1}{vpp_note}, and no layers "
                              f"without stages). Adjust the first/last stage layer counts.")
        per_middle = middle // middle_stages if middle_stages else 0
        return tuple(first if i == 0 and first is not None else
                     last if i == pp - 1 and last is not None else per_middle for i in range(pp))
    counted = layers + int(embedding) + int(loss)
    if counted % (pp * vpp):
        what = f"model.num_layers ({layers})"
        if embedding or loss:
            what = (f"({what}" + (" + embedding (1)" if embedding else "")
                    + (" + loss (1)" if loss else "") + f" = {counted})")
        hint = (" or set parallel.num_layers_in_first/last_pipeline_stage, or count the "
                "embedding/loss as layers (parallel.account_for_*_in_pipeline_split)"
                if not (embedding or loss) else "")
        raise ConfigError(f"{what} % parallel.pp ({pp}){vpp_note} = "
                          f"{counted % (pp * vpp)}: every pipeline stage needs the same number of "
                          f"layers. Choose pp/vpp dividing {counted}{hint}.")
    per_rank = counted // pp
    split = [per_rank] * pp
    split[0] -= int(embedding)
    split[-1] -= int(loss)
    return tuple(split)


def transformer_engine_features(cfg: Config) -> list[str]:
    """The settings of ``cfg`` that only Transformer Engine implements (empty when none)."""
    p, m = cfg.parallel, cfg.model
    features = []
    if p.cp > 1:
        features.append(f"parallel.cp={p.cp} (megatron-core's context-parallel attention is "
                        f"Transformer Engine's; its local attention asserts cp == 1)")
    if m.fp8:
        features.append(f"model.fp8={m.fp8} (FP8 GEMMs)")
    if p.tp_comm_overlap:
        features.append("parallel.tp_comm_overlap=true (userbuffers)")
    return features


def _check_performance(cfg: Config, dims: ParallelDims) -> None:
    """Communication overlap, recomputation, FP8 and garbage-collection settings."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if m.fp8 not in (None, "hybrid", "e4m3"):
        raise ConfigError(f"model.fp8={m.fp8!r} is not one of hybrid, e4m3 (or null).")
    if m.fp8 and m.params_dtype != "bf16":
        raise ConfigError(f"model.fp8={m.fp8} needs model.params_dtype=bf16 (FP8 GEMMs keep bf16 "
                          f"weights and activations between them), got {m.params_dtype}.")
    if p.tp_comm_overlap and (dims.tp < 2 or not p.sequence_parallel):
        raise ConfigError(f"parallel.tp_comm_overlap=true overlaps the all-gather/reduce-scatter "
                          f"of sequence parallelism: it needs parallel.tp >= 2 (got {dims.tp}) "
                          f"and parallel.sequence_parallel=true (got {p.sequence_parallel}).")
    if p.overlap_param_gather and not p.distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather=true needs parallel."
                          "distributed_optimizer=true (only the distributed optimizer gathers "
                          "parameters).")
    if p.align_param_gather and p.overlap_param_gather is False:
        raise ConfigError("parallel.align_param_gather=true needs parallel.overlap_param_gather "
                          "(it aligns the overlapped gathers); drop one of them.")
    if p.overlap_p2p_comm and not dims.vpp:
        raise ConfigError("parallel.overlap_p2p_comm=true needs parallel.vpp >= 2 (megatron-core "
                          "overlaps pipeline send/receive only in the interleaved schedule).")
    if p.ddp_bucket_size is not None and p.ddp_bucket_size < 1:
        raise ConfigError(f"parallel.ddp_bucket_size must be at least 1 parameter (or unset for "
                          f"megatron-core's default), got {p.ddp_bucket_size}.")
    if t.manual_gc_interval is not None and t.manual_gc_interval < 0:
        raise ConfigError(f"train.manual_gc_interval must be >= 0 (0 keeps automatic GC), got "
                          f"{t.manual_gc_interval}.")
    allowed = ("core_attn", "layernorm", "mlp")
    if t.recompute_modules is not None:
        bad = [x for x in t.recompute_modules if x not in allowed]
        if t.recompute != "selective" or bad or not t.recompute_modules:
            raise ConfigError(f"train.recompute_modules={t.recompute_modules} needs train."
                              f"recompute=selective (got {t.recompute}) and a non-empty list "
                              f"of {', '.join(allowed)}" + (f"; unknown: {bad}" if bad else "")
                              + ".")
    if t.recompute_num_layers is not None:
        per_stage = min(pipeline_split(cfg, dims)) // (dims.vpp or 1)
        if t.recompute != "full":
            raise ConfigError(f"train.recompute_num_layers={t.recompute_num_layers} applies to "
                              f"train.recompute=full only (got {t.recompute}).")
        if not 1 <= t.recompute_num_layers <= per_stage:
            raise ConfigError(f"train.recompute_num_layers ({t.recompute_num_layers}) must lie in "
                              f"1..{per_stage}, the layers of the smallest pipeline "
                              f"{'virtual ' if dims.vpp else ''}stage.")
