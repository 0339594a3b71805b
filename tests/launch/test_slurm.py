"""The Slurm launcher: the generated script for real example configs, validation before writing,
and the script itself running a tiny job through torchrun's c10d rendezvous on this machine."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flagscale.cli.main import main
from flagscale.config import config_to_dict, load_config
from flagscale.errors import ConfigError, FlagScaleError
from flagscale.launch.slurm import HEAD_ADDR_FUNCTION, SlurmOptions, launch_slurm

ROOT = Path(__file__).resolve().parents[2]
AQUILA = ROOT / "examples" / "aquila2_34b" / "h100_64nodes.yaml"


def test_aquila2_34b_64_node_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = launch_slurm(AQUILA, [], SlurmOptions(nodes=64, partition="gpu", time="2-00:00:00"),
                       dry_run=True)
    assert job.world_size == 512
    assert job.script.parent == tmp_path / "runs/aquila2_34b_h100_64nodes/slurm"
    assert job.script.name.startswith(job.job_name + "-") and job.script.suffix == ".sbatch"
    text = job.script.read_text()
    # The node count is written once, as the directive; everything else reads SLURM_NNODES.
    assert len(re.findall(r"\b64\b", text.replace("64nodes", ""))) == 1
    assert [line for line in text.splitlines() if "--nodes=64" in line] == ["#SBATCH --nodes=64"]
    # torchrun's agent, run by flagscale's launcher (it forwards stop signals to the workers).
    assert '-m flagscale.launch.local' in text and '--nnodes="$SLURM_NNODES"' in text
    # Saved and requeued before the time limit (launch.signal_seconds defaults to 300).
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@300" in text
    assert text.count("--nproc-per-node=8") == 1 and "#SBATCH --gpus-per-node=8" in text
    assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --partition=gpu" in text
    assert '--rdzv-backend=c10d' in text and '--rdzv-id="$SLURM_JOB_ID"' in text
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in text
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in text
    # The allocator and NCCL settings of the Megatron-LM / NeMo H100 recipes.
    assert "export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}" in text
    assert "export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}" in text
    assert f"-m flagscale train {job.config}" in text
    # Every NCCL setting sits in one block of consecutive lines.
    lines = text.splitlines()
    nccl = [i for i, line in enumerate(lines) if "NCCL_" in line]
    assert nccl and all(lines[i].startswith(("export", "#")) for i in range(nccl[0], nccl[-1] + 1))
    subprocess.run(["bash", "-n", str(job.script)], check=True)
    # The job trains the resolved config that was validated.
    assert config_to_dict(load_config(job.config)) == config_to_dict(load_config(AQUILA))


def test_overrides_are_frozen_into_the_job_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = launch_slurm(AQUILA, ["train.iterations=100", "run.dir=out/short"],
                       SlurmOptions(nodes=64, job_name="short"), dry_run=True)
    assert job.script.parent == tmp_path / "out/short/slurm" and job.job_name == "short"
    assert load_config(job.config).train.iterations == 100
    # A second launch (the first may still wait in the queue) writes new files beside it.
    again = launch_slurm(AQUILA, ["train.iterations=200", "run.dir=out/short"],
                         SlurmOptions(nodes=64, job_name="short"), dry_run=True)
    assert again.script != job.script and again.config != job.config
    assert load_config(job.config).train.iterations == 100


def test_impossible_layout_fails_before_writing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"3 nodes x 8 GPUs = 24 processes.*tp\*pp\*cp=16"):
        launch_slurm(AQUILA, [], SlurmOptions(nodes=3), dry_run=True)
    with pytest.raises(ConfigError, match="--partition"):
        launch_slurm(AQUILA, [], SlurmOptions(nodes=64, partition="gpu a100"), dry_run=True)
    with pytest.raises(ConfigError, match="Unknown config key 'train.iteration'"):
        launch_slurm(AQUILA, ["train.iteration=5"], SlurmOptions(nodes=64), dry_run=True)
    assert list(tmp_path.iterdir()) == []


def test_missing_sbatch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FlagScaleError, match="sbatch is not on PATH"):
        launch_slurm(AQUILA, [], SlurmOptions(nodes=64))
    assert list(tmp_path.iterdir()) == []


def test_cli_dry_run_prints_script_and_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["launch", str(AQUILA), "--slurm", "--nodes", "64", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash") and "#SBATCH --nodes=64" in out
    assert "not submitted (--dry-run); submit with: sbatch " in out
    assert main(["launch", str(AQUILA), "--nodes", "64"]) == 1
    assert "add --slurm" in capsys.readouterr().err


def test_a_layout_that_does_not_fit_in_memory_is_refused_unless_forced(tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.chdir(tmp_path)
    llama8b = ROOT / "examples" / "llama3_8b" / "h100_1node.yaml"
    args = ["launch", str(llama8b), "--slurm", "--nodes", "1", "--dry-run",
            "model.preset=llama3_1_405b"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert re.search(r"on 1 node\(s\) x 8 h100-sxm: Layout tp=2 pp=1 dp=4 needs \d+\.\d GiB per "
                     r"GPU .* but a h100-sxm \(80 GiB\) has 69\.3 GiB usable\. No layout of this "
                     r"model fits on 8 GPUs", err), err
    assert "pass --force" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    assert main(args + ["--force"]) == 0
    assert "(does not fit; launched with --force)" in capsys.readouterr().out
    # The example's own layout fits one node, and the planner names a layout that would.
    assert main(["launch", str(llama8b), "--slurm", "--nodes", "1", "--dry-run"]) == 0
    assert re.search(r"# memory: \d+\.\d GiB per GPU planned for tp=2 pp=1 dp=4, 69\.3 usable on "
                     r"a h100-sxm\n", capsys.readouterr().out)
    assert main(["launch", str(llama8b), "--slurm", "--nodes", "1", "--dry-run",
                 "parallel.tp=1", "parallel.sequence_parallel=false"]) == 1
    assert "The preferred layout that fits on 8 GPUs is tp=2 pp=1 dp=4" in capsys.readouterr().err


def _head_addr(host: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", HEAD_ADDR_FUNCTION + '\nflagscale_head_addr "$1"', "-",
                           host], capture_output=True, text=True)


def test_head_address_is_never_loopback():
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    result = _head_addr(host)
    if result.returncode != 0:
        assert "set FLAGSCALE_HEAD_ADDR" in result.stderr
        pytest.skip("this machine has no non-loopback IPv4 address")
    addr = result.stdout.strip()
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", addr) and not addr.startswith("127.")


SHIMS = {
    # One-node stand-ins for the two Slurm commands the script calls; everything else is real.
    "scontrol": '#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] && echo "$3"\n',
    "srun": '#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"\n',
}


def test_generated_script_runs_a_tiny_job_on_one_node(tmp_path, tiny_corpus, tiny_tokenizer):
    """The script's rendezvous, torchrun and train invocation, run on this machine as a 1-node job
    (srun and scontrol replaced by one-node stand-ins): 2 workers train 1 iteration."""
    shims = tmp_path / "shims"
    shims.mkdir()
    for name, text in SHIMS.items():
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    run_dir = tmp_path / "run"
    job = launch_slurm(ROOT / "examples/tiny/config.yaml",
                       ["train.iterations=1", "checkpoint.save_interval=0",
                        f"data.paths=[{tiny_corpus}]", f"data.tokenizer={tiny_tokenizer}",
                        f"run.dir={run_dir}"],
                       SlurmOptions(nodes=1, gpus_per_node=2), dry_run=True, python=sys.executable)
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": host, "SLURM_CPUS_ON_NODE": "2"}
    if _head_addr(host).returncode != 0:
        env["FLAGSCALE_HEAD_ADDR"] = "127.0.0.1"
    result = subprocess.run(["bash", str(job.script)], env=env, capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert re.search(r"rendezvous [\d.]+:19242 ", result.stdout)  # 15000 + 4242
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1]


def test_generated_script_saves_and_requeues_on_the_time_limit_signal(tmp_path, tiny_corpus,
                                                                       tiny_tokenizer):
    """Slurm's warning signal (SIGUSR1 to the batch shell) -> the workers save and exit 75 -> the
    script requeues the job; the requeued attempt resumes from that checkpoint."""
    from flagscale.platform.lifetime import EXIT_REQUEUE
    from tests.launch.test_local import logged_iterations, wait_for

    shims = tmp_path / "shims"
    shims.mkdir()
    requeues = tmp_path / "requeues.log"
    shim_text = {
        "scontrol": '#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] && echo "$3"\n'
                    f'[[ $1 == requeue ]] && echo "requeue $2" >> {requeues}\nexit 0\n',
        "srun": SHIMS["srun"],
    }
    for name, text in shim_text.items():
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    run_dir = tmp_path / "run"
    job = launch_slurm(ROOT / "examples/tiny/config.yaml",
                       ["train.iterations=30", "train.log_interval=1", "checkpoint.save_interval=0",
                        "trace.enabled=false",
                        "launch.signal_seconds=120", "checkpoint.load=null",
                        f"data.paths=[{tiny_corpus}]", f"data.tokenizer={tiny_tokenizer}",
                        f"run.dir={run_dir}"],
                       SlurmOptions(nodes=1, gpus_per_node=2), dry_run=True, python=sys.executable)
    assert "#SBATCH --signal=B:USR1@120" in job.script.read_text()
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "SLURM_JOB_ID": "4243",
           "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": host, "SLURM_CPUS_ON_NODE": "2"}
    if _head_addr(host).returncode != 0:
        env["FLAGSCALE_HEAD_ADDR"] = "127.0.0.1"
    proc = subprocess.Popen(["bash", str(job.script)], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(lambda: len(logged_iterations(run_dir)) >= 2, "iteration 2", proc)
    proc.send_signal(subprocess.signal.SIGUSR1)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_REQUEUE, output[-3000:]
    assert requeues.read_text() == "requeue 4243\n"
    stopped_at = logged_iterations(run_dir)[-1]
    assert stopped_at < 30
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{stopped_at:07d}"

    # The requeued attempt (same job id, SLURM_RESTART_COUNT=1) resumes with checkpoint.load=auto.
    again = subprocess.run(["bash", str(job.script)], env={**env, "SLURM_RESTART_COUNT": "1"},
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert f"resuming at iteration {stopped_at}" in again.stdout
    assert logged_iterations(run_dir) == list(range(1, 31))
    assert requeues.read_text() == "requeue 4243\n"
