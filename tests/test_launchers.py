"""The multi-host launchers: ``tpu/launch.sh`` (a TPU VM pod slice, through gcloud) and
``tpu/slurm.sh`` (a SLURM GPU cluster, through sbatch). ``--dry-run`` prints what would run and runs
nothing; a real run hands exactly the printed commands to gcloud and the printed batch script to
sbatch (fakes on PATH that record what they get); the batch script itself runs the command through
srun with the venv active; bad arguments are usage errors (exit 2). No network, no cluster."""
from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "tpu" / "launch.sh"
SLURM = ROOT / "tpu" / "slurm.sh"
SYSTEM_PATH = "/usr/bin:/bin"
# A command whose quoting must survive: a path with a space, an apostrophe, a literal $HOME.
USER_CMD = """rmjax train --config "my dir/base.yaml" run_dir='runs/it'"'"'s here' --note=$HOME"""
USER_ARGV = ["rmjax", "train", "--config", "my dir/base.yaml", "run_dir=runs/it's here", "--note=$HOME"]

FAKE = r"""#!/usr/bin/env bash
name=${0##*/}
{ printf '%s\0' "$@"; printf '\1'; } >> "$FAKE_LOG/$name.calls"
case $name in
  sbatch) cat > "$FAKE_LOG/sbatch.stdin"; echo 4242 ;;
  srun) env > "$FAKE_LOG/srun.env" ;;
esac
"""


@pytest.fixture
def fake(tmp_path):
    """A bin directory with fake gcloud / sbatch / srun, and the folder where they record calls."""
    bin_dir, log = tmp_path / "fakebin", tmp_path / "calls"
    bin_dir.mkdir()
    log.mkdir()
    for name in ("gcloud", "sbatch", "srun"):
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(0o755)
    return bin_dir, log


def calls(log: Path, name: str) -> list[list[str]]:
    f = log / f"{name}.calls"
    if not f.exists():
        return []
    return [rec.decode().split("\0")[:-1] for rec in f.read_bytes().split(b"\1")[:-1]]


def run(script: Path, args, fake, cwd: Path, path: str | None = None, **env):
    bin_dir, log = fake
    env = {"PATH": path or f"{bin_dir}:{SYSTEM_PATH}", "HOME": str(cwd), "FAKE_LOG": str(log), **env}
    return subprocess.run(["bash", str(script), *args], check=False, env=env, cwd=cwd, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=30)


# ---------------------------------------------------------------------------- tpu/launch.sh

def _git_files(repo) -> list[str]:
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    return sorted(x for x in out.decode().split("\0") if x)


def test_tpu_dry_run_prints_the_gcloud_commands_and_runs_nothing(fake, tmp_path):
    out = run(LAUNCH, ["--dry-run", "my-v5e-32", "us-west4-a", USER_CMD, "my-project"], fake, tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    tar, scp, ssh = (shlex.split(ln) for ln in lines)
    where = ["--worker=all", "--zone", "us-west4-a", "--project", "my-project"]
    top = Path(subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--show-toplevel"], capture_output=True,
                              text=True, check=True).stdout.strip())
    assert tar[:2] == ["tar", "-czf"] and tar[3:5] == ["-C", str(top)] and tar[5:7] == ["--null", "--files-from"]
    listed = sorted(x for x in Path(tar[7]).read_bytes().decode().split("\0") if x)
    assert listed == _git_files(top)  # exactly what git sees
    assert not any(x.startswith((".venv/", ".git/")) for x in listed)
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[5:10] == where
    assert scp[10:] == [tar[2], "my-v5e-32:~/rmjax-src.tar.gz"]
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5e-32"] and ssh[6:11] == where
    remote = ssh[-1]
    assert remote.startswith("set -e; mkdir -p ~/rmjax; tar -xzf ~/rmjax-src.tar.gz -C ~/rmjax;")
    assert "pip install -q -e . 'jax[tpu]'" in remote
    assert remote.endswith(". .venv/bin/activate && " + USER_CMD)  # the command as given, quotes and all
    assert shlex.split(USER_CMD) == USER_ARGV
    assert calls(fake[1], "gcloud") == []


def test_tpu_run_hands_gcloud_exactly_the_printed_commands(fake, tmp_path):
    args = ["my-v5e-32", "us-west4-a", USER_CMD]
    dry = run(LAUNCH, ["--dry-run", *args], fake, tmp_path)
    assert calls(fake[1], "gcloud") == []
    real = run(LAUNCH, args, fake, tmp_path, REPO_DIR="rm")
    assert real.returncode == 0, real.stderr
    got = calls(fake[1], "gcloud")
    want = [shlex.split(ln.replace("~/rmjax;", "~/rm;").replace("~/rmjax ", "~/rm "))[1:]
            for ln in dry.stdout.splitlines()[1:]]
    strip = lambda c: [a if not a.endswith("rmjax-src.tar.gz") or ":" in a else "TARBALL" for a in c]  # noqa: E731
    assert [strip(c) for c in got] == [strip(c) for c in want]
    assert not any("--project" in c for c in got)


def test_tpu_copies_exactly_what_git_sees(fake, tmp_path):
    repo = tmp_path / "checkout"
    for name, text in {".gitignore": ".venv/\nruns/\n*.log\n", "pyproject.toml": "", "configs/new.yaml": "",
                       "configs/debug.log": "", ".venv/bin/python": "", "runs/old/result.json": "",
                       "tpu/launch.sh": LAUNCH.read_text()}.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    out = run(repo / "tpu" / "launch.sh", ["--dry-run", "t", "z", "rmjax score"], fake, tmp_path)
    assert out.returncode == 0, out.stderr
    tar = shlex.split(out.stdout.splitlines()[0])
    listed = sorted(x for x in Path(tar[7]).read_bytes().decode().split("\0") if x)
    assert listed == [".gitignore", "configs/new.yaml", "pyproject.toml", "tpu/launch.sh"]  # no nested ignored file
    assert Path(tar[4]).resolve() == repo.resolve()


@pytest.mark.parametrize("args", [
    [],
    ["my-tpu", "us-west4-a"],
    ["my-tpu", "us-west4-a", "rmjax score", "my-project", "extra"],
    ["--bogus", "my-tpu", "us-west4-a", "rmjax score"],
    ["my-tpu", "us-west4-a", "rmjax score", "--dry-run"],  # options go first: never a real run by mistake
    ["my-tpu", "us-west4-a", "  "],
    ["", "us-west4-a", "rmjax score"],
])
def test_tpu_bad_arguments_are_usage_errors(fake, tmp_path, args):
    out = run(LAUNCH, args, fake, tmp_path)
    assert out.returncode == 2 and "usage:" in out.stderr and out.stdout == ""
    assert calls(fake[1], "gcloud") == []


# ---------------------------------------------------------------------------- tpu/slurm.sh

SLURM_ARGS = ["--nodes", "4", "--gpus-per-node=8", "--partition", "gpu", "--time", "02:00:00",
              "--account", "my-acct", "--venv", "/shared/rmjax-venv", "--", *USER_ARGV]
SUBMIT_ENV = {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true --xla_dump_to='/tmp/x y'",
              "NCCL_DEBUG": "WARN", "RMJAX_COORDINATOR": "10.0.0.1:1234", "UNRELATED": "1"}


def split_dry_run(stdout: str) -> tuple[list[str], str]:
    """(the commands around the here-document, the batch script inside it)."""
    lines = stdout.splitlines()
    start = lines.index("sbatch --parsable <<'RMJAX_BATCH_SCRIPT'")
    assert lines[-1] == "RMJAX_BATCH_SCRIPT"
    return lines[:start + 1], "\n".join(lines[start + 1:-1]) + "\n"


def test_slurm_dry_run_prints_the_batch_script_and_submits_nothing(fake, tmp_path):
    out = run(SLURM, ["--dry-run", *SLURM_ARGS], fake, tmp_path, **SUBMIT_ENV)
    assert out.returncode == 0, out.stderr
    commands, script = split_dry_run(out.stdout)
    assert commands == ["mkdir -p logs", "sbatch --parsable <<'RMJAX_BATCH_SCRIPT'"]
    lines = script.splitlines()
    assert lines[0].startswith("#!")
    sbatch_opts = [ln.removeprefix("#SBATCH ") for ln in lines if ln.startswith("#SBATCH ")]
    assert sbatch_opts == ["--job-name=rmjax", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
                           "--partition=gpu", "--account=my-acct", "--time=02:00:00", "--output=logs/%x-%j.out"]
    assert ". /shared/rmjax-venv/bin/activate" in script
    assert "unset RMJAX_COORDINATOR RMJAX_NUM_PROCESSES RMJAX_PROCESS_ID" in lines
    exports = dict(shlex.split(ln)[1].split("=", 1) for ln in lines if ln.startswith("export "))
    assert exports == {"JAX_LOCAL_DEVICE_IDS": "0,1,2,3,4,5,6,7", "XLA_FLAGS": SUBMIT_ENV["XLA_FLAGS"],
                       "NCCL_DEBUG": "WARN"}
    srun = [shlex.split(ln) for ln in lines if ln.startswith("srun ")]
    assert srun == [["srun", "--kill-on-bad-exit=1", *USER_ARGV]]
    assert lines.index(next(ln for ln in lines if ln.startswith("set +u; . "))) < lines.index(
        next(ln for ln in lines if ln.startswith("srun ")))
    assert calls(fake[1], "sbatch") == [] and not (tmp_path / "logs").exists()


def test_slurm_batch_script_runs_the_command_through_srun(fake, tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text('export RMJAX_TEST_VENV="$PS1_NEVER_SET/active"\n')  # unset var: fine
    out = run(SLURM, ["--dry-run", "--nodes", "2", "--gpus-per-node", "2", "--venv", str(venv), "--", *USER_ARGV],
              fake, tmp_path, **SUBMIT_ENV)
    _, script = split_dry_run(out.stdout)
    (tmp_path / "job.sh").write_text(script)
    job = run(tmp_path / "job.sh", [], fake, tmp_path, SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="2",
              SLURM_JOB_NODELIST="gpu[01-02]", RMJAX_COORDINATOR="10.0.0.1:1234", RMJAX_PROCESS_ID="0")
    assert job.returncode == 0, job.stderr
    assert "rmjax: job 77, 2 node(s): gpu[01-02]" in job.stdout
    assert calls(fake[1], "srun") == [["--kill-on-bad-exit=1", *USER_ARGV]]
    env = dict(ln.split("=", 1) for ln in (fake[1] / "srun.env").read_text().splitlines() if "=" in ln)
    assert env["RMJAX_TEST_VENV"] == "/active" and env["JAX_LOCAL_DEVICE_IDS"] == "0,1"
    assert env["XLA_FLAGS"] == SUBMIT_ENV["XLA_FLAGS"]
    assert "RMJAX_COORDINATOR" not in env and "RMJAX_PROCESS_ID" not in env


def test_slurm_submits_the_printed_script_to_sbatch_on_stdin(fake, tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    args = ["--nodes", "2", "--exclusive", "--cpus-per-task", "32", "--job-name", "rm-bt", "--output",
            "out/slurm/%x-%j.log", "--sbatch", "--qos=high", "--venv", str(venv), "--", *USER_ARGV]
    dry = run(SLURM, ["--dry-run", *args], fake, tmp_path, **SUBMIT_ENV)
    commands, script = split_dry_run(dry.stdout)
    assert commands[0] == "mkdir -p out/slurm"
    for opt in ("--exclusive", "--cpus-per-task=32", "--job-name=rm-bt", "--output=out/slurm/%x-%j.log",
                "--qos=high"):
        assert f"#SBATCH {opt}" in script.splitlines()
    real = run(SLURM, args, fake, tmp_path, **SUBMIT_ENV)
    assert real.returncode == 0, real.stderr
    assert calls(fake[1], "sbatch") == [["--parsable"]]
    assert (fake[1] / "sbatch.stdin").read_text() == script
    assert (tmp_path / "out" / "slurm").is_dir()
    assert "submitted job 4242" in real.stdout and "out/slurm/rm-bt-4242.log" in real.stdout


def test_slurm_without_gpus_asks_for_none(fake, tmp_path):
    out = run(SLURM, ["--dry-run", "--gpus-per-node", "0", "--", "rmjax", "score"], fake, tmp_path)
    _, script = split_dry_run(out.stdout)
    assert "gpus-per-node" not in script and "JAX_LOCAL_DEVICE_IDS" not in script
    assert "srun --kill-on-bad-exit=1 rmjax score" in script.splitlines()


def test_slurm_needs_sbatch_and_the_venv(fake, tmp_path):
    if shutil.which("sbatch", path=SYSTEM_PATH):
        pytest.skip("this machine has a real sbatch")
    out = run(SLURM, ["--", "rmjax", "score"], fake, tmp_path, path=SYSTEM_PATH)
    assert out.returncode == 1 and "sbatch not found" in out.stderr
    out = run(SLURM, ["--venv", str(tmp_path / "missing"), "--", "rmjax", "score"], fake, tmp_path)
    assert out.returncode == 1 and f"no venv at {tmp_path / 'missing'}" in out.stderr
    assert calls(fake[1], "sbatch") == []


@pytest.mark.parametrize("args", [
    [],
    ["--nodes", "2"],
    ["--"],
    ["--nodes"],
    ["--nodes", "0", "--", "rmjax", "score"],
    ["--nodes", "two", "--", "rmjax", "score"],
    ["--gpus-per-node", "-1", "--", "rmjax", "score"],
    ["--time", "soon", "--", "rmjax", "score"],
    ["--partition", "a b", "--", "rmjax", "score"],
    ["--dry-run=yes", "--", "rmjax", "score"],
    ["--bogus", "--", "rmjax", "score"],
])
def test_slurm_bad_arguments_are_usage_errors(fake, tmp_path, args):
    out = run(SLURM, args, fake, tmp_path)
    assert out.returncode == 2 and "usage:" in out.stderr and out.stdout == ""
    assert calls(fake[1], "sbatch") == []
