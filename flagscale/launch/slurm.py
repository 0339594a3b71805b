"""Multi-node training on Slurm: one sbatch script, one torchrun per node, c10d rendezvous.

    job = launch_slurm("examples/aquila2_34b/h100_64nodes.yaml", [], SlurmOptions(nodes=64),
                       dry_run=True)
    job.script          # runs/aquila2_34b_h100_64nodes/slurm/<job>-<date>-<time>.sbatch
    job.command         # ['sbatch', '<that path>']

The config is validated for ``nodes * gpus_per_node`` processes before anything is written (data
paths are not checked: they live on the cluster). Then two files named ``<job>-<date>-<time>`` are
written under ``run.dir/slurm/``, never overwriting an earlier launch: ``.yaml``, the resolved
config with the overrides applied (a job waiting in the queue trains exactly what was validated,
whatever happens to the source file meanwhile), and ``.sbatch``, the script, which:

- asks for the nodes in one place (``#SBATCH --nodes``); everything else reads ``$SLURM_NNODES``,
  so ``sbatch --nodes=...`` on the command line cannot leave a second, stale count behind (the
  workers re-validate the layout for the world size they find);
- runs one ``srun`` task per node executing ``torchrun --nnodes=$SLURM_NNODES
  --rdzv-backend=c10d --rdzv-id=$SLURM_JOB_ID``: the c10d rendezvous assigns node ranks, none are
  fixed by hand;
- resolves the head node (first of ``scontrol show hostnames``) to a non-loopback IPv4 address and
  derives the rendezvous port from the job id (see :data:`HEAD_ADDR_FUNCTION`);
- tells torchrun on node 0 that it hosts the rendezvous store (``--rdzv-conf=is_host=1``): torchrun
  otherwise guesses by matching the endpoint against the machine's own names and addresses, which
  fails for an address on a secondary network interface and leaves every node waiting;
- sets ``CUDA_DEVICE_MAX_CONNECTIONS=1`` and keeps every NCCL setting in one commented block;
- saves and requeues before the time limit: Slurm sends the batch shell SIGUSR1
  ``launch.signal_seconds`` before it (``#SBATCH --signal=B:USR1@N``), the script passes it (and
  SIGTERM) to ``srun``, which forwards it to every node's launcher
  (:mod:`flagscale.launch.local`); the workers save after their current step and exit with
  :data:`~flagscale.platform.lifetime.EXIT_REQUEUE`, on which the script runs ``scontrol requeue``
  (``#SBATCH --requeue``). A requeued job (``SLURM_RESTART_COUNT`` > 0) resumes with
  ``checkpoint.load=auto``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from flagscale.config import Config, dump_config, load_config, validate
from flagscale.errors import ConfigError, FlagScaleError
from flagscale.platform.lifetime import EXIT_REQUEUE

RDZV_PORT_BASE = 15000
"""Rendezvous ports are ``15000 + job id % 15000``: distinct for concurrent jobs sharing a head
node, and below Linux's ephemeral range (32768-60999) where outgoing connections take ports."""

HEAD_ADDR_FUNCTION = r"""
# The head node's IPv4 address as the other nodes reach it; never loopback.
# Pitfalls: on the head itself `hostname -i` and `getent hosts` often answer 127.0.1.1 (the
# Debian-style /etc/hosts line for the machine's own name), so every other node would dial
# itself; `hostname -I` lists all interfaces (docker0, IPoIB, ...), in no promised order.
# Ask the name service first (what other nodes resolve), skipping loopback; otherwise take the
# head's own first non-loopback IPv4 address; otherwise stop: no silent fallback to localhost.
flagscale_head_addr() {
    local host=$1 addr addrs
    for addr in $(getent ahostsv4 "$host" | awk '{print $1}'); do
        case $addr in 127.*) ;; *) echo "$addr"; return 0 ;; esac
    done
    if [[ $(hostname -s) == "${host%%.*}" ]]; then
        addrs=$(hostname -I)
    else
        addrs=$(srun --nodes=1 --ntasks=1 --overlap -w "$host" hostname -I)
    fi
    for addr in $addrs; do
        case $addr in 127.*|*:*) ;; *) echo "$addr"; return 0 ;; esac
    done
    echo "flagscale: no non-loopback IPv4 address for head node $host (getent ahostsv4 and" \
         "hostname -I on it found none); set FLAGSCALE_HEAD_ADDR to an address the other" \
         "nodes can reach and resubmit." >&2
    return 1
}
""".strip("\n")
"""Bash function ``flagscale_head_addr HOST`` used by the generated script."""


@dataclass(frozen=True)
class SlurmOptions:
    """What the job asks Slurm for."""

    nodes: int
    gpus_per_node: int = 8
    partition: Optional[str] = None
    time: Optional[str] = None
    """Wall-clock limit in any Slurm format (``2-00:00:00``, ``48:00:00``)."""
    account: Optional[str] = None
    job_name: Optional[str] = None
    """Defaults to ``flagscale-<run directory name>``."""


@dataclass(frozen=True)
class SlurmJob:
    """The files written for a job and how to submit it."""

    script: Path
    config: Path
    command: list[str]
    job_name: str
    world_size: int
    submitted: Optional[str] = None
    """sbatch's answer (``Submitted batch job 1234``) when the job was submitted."""


def _check_options(opts: SlurmOptions) -> None:
    if opts.nodes < 1 or opts.gpus_per_node < 1:
        raise ConfigError(f"--nodes ({opts.nodes}) and --gpus-per-node ({opts.gpus_per_node}) "
                          f"must be at least 1.")
    for flag, value in (("--partition", opts.partition), ("--time", opts.time),
                        ("--account", opts.account), ("--job-name", opts.job_name)):
        # Each becomes an `#SBATCH` line: whitespace would end the directive or add a line.
        if value is not None and (not value or re.search(r"\s", value)):
            raise ConfigError(f"{flag} {value!r} must be a non-empty value without spaces.")


def _sbatch_directives(opts: SlurmOptions, job_name: str, workdir: Path,
                       log_dir: Path, signal_seconds: int = 0) -> list[str]:
    lines = [f"--job-name={job_name}", f"--nodes={opts.nodes}", "--ntasks-per-node=1",
             f"--gpus-per-node={opts.gpus_per_node}",
             # Whole nodes: the one task per node starts every GPU worker and its data loading.
             "--exclusive", f"--chdir={workdir}", f"--output={log_dir}/%x-%j.out",
             # %j: a requeued job keeps its id, so its attempts append to one log.
             "--open-mode=append", "--requeue"]
    if signal_seconds:
        lines.append(f"--signal=B:USR1@{signal_seconds}")
    lines += [f"--{name}={value}" for name, value in
              (("partition", opts.partition), ("time", opts.time), ("account", opts.account))
              if value is not None]
    return [f"#SBATCH {line}" for line in lines]


def render_sbatch(config: Path, script: Path, opts: SlurmOptions, job_name: str, workdir: Path,
                  log_dir: Path, python: str, layout_note: str, source_note: str,
                  signal_seconds: int = 0) -> str:
    """The text of the sbatch script (see the module docstring for what it does and why)."""
    q = shlex.quote
    header = [
        "#!/bin/bash",
        f"# Generated by `flagscale launch --slurm` from {source_note}.",
        f"# Validated for {layout_note}.",
        f"# Submit: sbatch {q(str(script))}",
        "# The node count is the --nodes line below; the script reads it back as $SLURM_NNODES.",
        *_sbatch_directives(opts, job_name, workdir, log_dir, signal_seconds),
    ]
    body = f"""
set -euo pipefail

# ---- CUDA and NCCL: every communication setting of the job is in this block ----
# Megatron's tensor/sequence-parallel communication overlap needs kernels to reach the GPU in
# issue order: one hardware work queue.
export CUDA_DEVICE_MAX_CONNECTIONS=1
# Megatron-LM / NeMo H100 recipes: growable allocator segments instead of fragmentation between
# microbatch shapes; NCCL frees buffers on its own stream instead of recording every tensor on the
# communication stream (less allocator churn with overlapped gradient reduction); NVLink SHARP
# off, as the recipes run (it reserves memory and the pipeline p2p gains nothing from it).
export PYTORCH_CUDA_ALLOC_CONF=${{PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}}
export TORCH_NCCL_AVOID_RECORD_STREAMS=${{TORCH_NCCL_AVOID_RECORD_STREAMS:-1}}
export NCCL_NVLS_ENABLE=${{NCCL_NVLS_ENABLE:-0}}
export NCCL_DEBUG=${{NCCL_DEBUG:-WARN}}
# Turn a hung or failed collective into an error (and a failed job) instead of a silent hang.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${{TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}}
# Set these for your fabric if NCCL does not pick the right devices by itself:
# export NCCL_SOCKET_IFNAME=ib0        # bootstrap/socket interface; never lo or docker0
# export NCCL_IB_HCA=mlx5              # InfiniBand adapters to use
# export NCCL_IB_GID_INDEX=3           # RoCE: the GID index of the routable (v2) address
# export NCCL_NET_GDR_LEVEL=PHB        # GPUDirect RDMA when GPU and NIC share a PCIe host bridge

# The interpreter that has flagscale installed (the submitting one unless overridden).
PYTHON=${{FLAGSCALE_PYTHON:-{q(python)}}}

{HEAD_ADDR_FUNCTION}

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
if [[ -n ${{FLAGSCALE_HEAD_ADDR:-}} ]]; then
    head_addr=$FLAGSCALE_HEAD_ADDR
else
    head_addr=$(flagscale_head_addr "$head_node")
fi
rdzv_port=$(( {RDZV_PORT_BASE} + SLURM_JOB_ID % {RDZV_PORT_BASE} ))
echo "flagscale: job $SLURM_JOB_ID on $SLURM_NNODES nodes, rendezvous $head_addr:$rdzv_port" \\
     "(head node $head_node)"

# A requeued attempt continues from the run's newest complete checkpoint.
resume=()
if (( ${{SLURM_RESTART_COUNT:-0}} > 0 )); then
    resume=(checkpoint.load=auto)
fi

# One task per node, each flagscale's launcher (torchrun's agent, plus stop-signal forwarding)
# starting {opts.gpus_per_node} workers; node 0 (the head) hosts the rendezvous store.
# --kill-on-bad-exit ends every node when one fails. srun runs in the background so that this
# shell can take SIGUSR1 (sent {signal_seconds or "never"} s before the time limit) and SIGTERM
# at once and pass them on; srun forwards a signal it gets to every task.
srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" \\
    --kill-on-bad-exit=1 \\
    bash -c 'exec "$0" -m flagscale.launch.local --rdzv-conf=is_host=$((SLURM_NODEID==0)) "$@"' \\
    "$PYTHON" --nnodes="$SLURM_NNODES" --nproc-per-node={opts.gpus_per_node} \\
    --rdzv-backend=c10d --rdzv-endpoint="$head_addr:$rdzv_port" --rdzv-id="$SLURM_JOB_ID" \\
    --max-restarts=0 \\
    -m flagscale train {q(str(config))} "${{resume[@]}}" &
srun_pid=$!
trap 'kill -USR1 "$srun_pid" 2>/dev/null || true' USR1
trap 'kill -TERM "$srun_pid" 2>/dev/null || true' TERM
set +e
while :; do
    wait "$srun_pid"
    status=$?
    # A trapped signal ends `wait` early; keep waiting until srun itself has exited.
    kill -0 "$srun_pid" 2>/dev/null || break
done
set -e
# {EXIT_REQUEUE}: every worker saved a complete checkpoint after a stop signal.
if (( status == {EXIT_REQUEUE} )); then
    echo "flagscale: the run saved and stopped (exit {EXIT_REQUEUE}); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
"""
    return "\n".join(header) + "\n" + body


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)


def launch_slurm(config: str | os.PathLike, overrides: Sequence[str], opts: SlurmOptions,
                 dry_run: bool = False, python: Optional[str] = None,
                 check: Optional[Callable[[Config, int], None]] = None) -> SlurmJob:
    """Validate, write ``run.dir/slurm/<job>-<date>-<time>.{yaml,sbatch}``, submit with sbatch.

    With ``dry_run`` the files are written but not submitted. Raises :class:`ConfigError` for a
    config or layout that does not fit ``opts.nodes * opts.gpus_per_node`` (before writing
    anything) and :class:`FlagScaleError` when sbatch is missing or refuses the job. ``check``
    (the CLI passes the memory planner's) is called with the resolved config and the world size
    once the layout is valid, before anything is written.
    """
    _check_options(opts)
    cfg = load_config(config, overrides)
    world = opts.nodes * opts.gpus_per_node
    try:
        layout = validate(cfg, world, check_paths=False)
    except ConfigError as exc:
        raise ConfigError(f"{config} cannot run on {opts.nodes} nodes x {opts.gpus_per_node} GPUs "
                          f"= {world} processes: {exc}") from None
    if check is not None:
        check(cfg, world)
    if not dry_run and shutil.which("sbatch") is None:
        raise FlagScaleError("sbatch is not on PATH: run `flagscale launch` on a Slurm login "
                             "node, or add --dry-run to only write the script.")
    workdir = Path.cwd()
    run_dir = (workdir / cfg.run.dir).resolve()
    job_name = opts.job_name or "flagscale-" + re.sub(r"[^A-Za-z0-9._-]", "_", run_dir.name)
    log_dir = run_dir / "slurm"
    log_dir.mkdir(parents=True, exist_ok=True)
    # A queued job reads its config when it starts: a later launch must never overwrite it.
    stem = f"{job_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    stem = next(f"{stem}{suffix}" for suffix in ("", *(f"-{i}" for i in range(2, 1000)))
                if not (log_dir / f"{stem}{suffix}.sbatch").exists())
    frozen = log_dir / f"{stem}.yaml"
    script = log_dir / f"{stem}.sbatch"
    source = f"{config}" + (f" with {' '.join(overrides)}" if overrides else "")
    _write_atomic(frozen, f"# Resolved from {source} by `flagscale launch --slurm`.\n"
                          + dump_config(cfg))
    _write_atomic(script, render_sbatch(
        frozen, script, opts, job_name, workdir, log_dir, python or sys.executable,
        layout.describe(), source, cfg.launch.signal_seconds), 0o755)
    command = ["sbatch", str(script)]
    if dry_run:
        return SlurmJob(script, frozen, command, job_name, world)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise FlagScaleError(f"sbatch refused {script} (exit {result.returncode}): "
                             f"{result.stderr.strip() or result.stdout.strip()}. Fix the "
                             f"partition/account/time options or the script and resubmit with "
                             f"`sbatch {script}`.")
    return SlurmJob(script, frozen, command, job_name, world, result.stdout.strip())
