"""Two processes on this machine (jax.distributed on 127.0.0.1, gloo, 4 CPU devices each = one
8-device mesh) train exactly as one process with 8 devices: the same loss at every step, the same
exported weights, the run directory's files written once."""
import json
import os

import numpy as np
import pytest

import processes
from hf_models import save_tiny_checkpoint
from rmjax.runs import scan_shards

OVERRIDES = ["train.steps=4", "train.save_every=2", "train.eval_every=4", "train.log_every=1", "train.batch_size=8",
             "train.trainable=lora", "train.lora_rank=4", "data.holdout=16", "data.train=hh-rlhf:harmless",
             "data.fraction=0.04", "data.max_length=96", "model.dtype=float32", "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mp_model")
    save_tiny_checkpoint(d)
    return d


def train(model_dir, run_dir, strategy, n, *extra):
    logs = run_dir.parent / f"{run_dir.name}_logs"
    logs.mkdir(parents=True, exist_ok=True)
    argv = ["train", "--no-progress", f"model.name={model_dir}", f"run_dir={run_dir}", f"mesh.strategy={strategy}",
            *OVERRIDES, *extra]
    codes = processes.run(argv, n=n, devices=8 // n, timeout=400, logs=logs)
    assert codes == [0] * n, processes.tails(logs, n)
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_as_one(model_dir, tmp_path, strategy, *extra):
    """The same run on one process of 8 devices and on two of 4: the same metric lines (each once),
    losses, accuracies and exported weights."""
    from safetensors.numpy import load_file

    one = train(model_dir, tmp_path / "one", strategy, 1, *extra)
    two = train(model_dir, tmp_path / "two", strategy, 2, *extra)
    assert [(m["step"], m["kind"]) for m in two] == [(m["step"], m["kind"]) for m in one]  # each line once
    assert {m["kind"] for m in one} == {"train", "eval"}
    for a, b in zip(one, two):
        for key in ("loss", "accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    wa, wb = load_file(str(tmp_path / "one" / "final" / "model.safetensors")), \
        load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], atol=1e-5, err_msg=k)
    return json.loads((tmp_path / "two" / "result.json").read_text())


@pytest.mark.slow
def test_two_processes_train_as_one_in_every_run(model_dir, tmp_path):
    """fsdp_tp (the batch and the params both span the processes), 2 steps and an eval on 40 short
    pairs of a file: small enough for every run; the longer runs of every strategy below on request."""
    data = _pairs(tmp_path / "pairs.jsonl", 40)
    result = train_as_one(model_dir, tmp_path, "fsdp_tp", "train.steps=2", "train.eval_every=2",
                          f"data.train={data}", "data.fraction=1.0", "data.holdout=8")
    assert result["step"] == 2 and result["train_examples"] == 32 and result["eval"]["examples"] == 8


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RMJAX_TEST_MULTIPROCESS_TRAIN"),
                    reason="about 100 s per strategy on 2 cores; set RMJAX_TEST_MULTIPROCESS_TRAIN=1 to run it")
@pytest.mark.parametrize("strategy", ["dp", "fsdp", "fsdp_tp"])  # fsdp_tp: batch and params both span processes
def test_two_processes_train_as_one(model_dir, tmp_path, strategy):
    assert train_as_one(model_dir, tmp_path, strategy)["step"] == 4


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RMJAX_TEST_MULTIPROCESS_TRAIN"),
                    reason="about 150 s on 2 cores; set RMJAX_TEST_MULTIPROCESS_TRAIN=1 to run it")
def test_two_process_training_killed_resumes_in_two_or_one_process(model_dir, tmp_path):
    """kill -9 of one of two training processes after a checkpoint, then the job restarted: from the
    orbax checkpoint the two processes wrote, two processes and (from a copy) one process each
    finish the run with the losses and weights of an uninterrupted run, every metric line once."""
    import shutil
    import signal
    import time

    from safetensors.numpy import load_file

    longer = ["train.steps=6", "train.eval_every=6"]
    ref = train(model_dir, tmp_path / "ref", "fsdp", 1, *longer)
    run_dir, logs = tmp_path / "killed", tmp_path / "killed_logs"
    logs.mkdir()
    argv = ["train", "--no-progress", f"model.name={model_dir}", f"run_dir={run_dir}", "mesh.strategy=fsdp",
            *OVERRIDES, *longer]
    procs = processes.start(argv, n=2, devices=4, logs=logs)
    try:
        deadline = time.time() + 300
        saved = lambda: [p for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit()]  # noqa: E731
        while time.time() < deadline and not ((run_dir / "checkpoints").exists() and saved()):
            assert all(p.poll() is None for p in procs), processes.tails(logs, 2)
            time.sleep(0.05)
        assert procs[1].poll() is None, "finished before it could be killed; the test needs a longer run"
        os.kill(procs[1].pid, signal.SIGKILL)
    finally:
        processes.stop(procs)
    assert not (run_dir / "result.json").exists()
    shutil.copytree(run_dir, tmp_path / "in_one")
    finished = {"two": train(model_dir, run_dir, "fsdp", 2, *longer),
                "one": train(model_dir, tmp_path / "in_one", "fsdp", 1, *longer)}
    assert "resumed from step" in (logs / "process0.log").read_text()
    weights = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    for name, metrics in finished.items():
        assert [m["step"] for m in metrics if m["kind"] == "train"] == list(range(1, 7)), name
        for a, b in zip(ref, metrics):
            for key in ("loss", "accuracy"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], abs=1e-5), (name, a["step"], key)
        out = load_file(str((run_dir if name == "two" else tmp_path / "in_one") / "final" / "model.safetensors"))
        for k in weights:
            np.testing.assert_allclose(out[k], weights[k], atol=1e-5, err_msg=f"{name}: {k}")


@pytest.mark.slow
def test_two_processes_score_and_cache_features_as_one(model_dir, tmp_path):
    """Each process scores (and caches features of) its own shards on its own devices (the model
    replicated per process, fsdp within it); every row is written once and equals the one-process
    run; the feature arrays too."""
    import pandas as pd

    from rmjax.scoring.features import FeatureCache

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Question {i}: {'why ' * i}?",
                                        "chosen": f"Because {i}.", "rejected": "No" + "!" * i}) + "\n"
                            for i in range(9)))
    # shards of 3: process 0 parses rows 0-3 and owns shards 0 and 1 (rows 3-5: it is handed rows 4-5)
    common = ["--data", str(data), "--shard-size", "3", "--strategy", "fsdp", "--no-progress"]
    jobs = {"score": ["score", "--policy", str(model_dir), "--reference", "", "--sample", "0", *common],
            "features": ["features", "--model", str(model_dir), "--max-length", "128", *common]}
    tables, caches = {}, {}
    for n in (1, 2):
        for job, argv in jobs.items():
            out, logs = tmp_path / f"{job}{n}", tmp_path / f"{job}{n}_logs"
            logs.mkdir()
            codes = processes.run([*argv, "--out", str(out)], n=n, devices=8 // n, timeout=300, logs=logs)
            assert codes == [0] * n, processes.tails(logs, n)
            assert json.loads((out / "metadata.json").read_text())["status"] == "complete"
        tables[n] = pd.read_parquet(tmp_path / f"score{n}" / "scores.parquet")
        caches[n] = FeatureCache(tmp_path / f"features{n}")
    for i, rows in enumerate(("0..3", "4..8")):  # each process parsed only its part of the file
        assert f"this process parsed rows {rows}, holds {4 + i}" in (tmp_path / "score2_logs" / f"process{i}.log"
                                                                    ).read_text()
    assert tables[2]["id"].tolist() == [f"p{i}" for i in range(9)]  # each row once, in record order
    numeric = [c for c in tables[1].columns if tables[1][c].dtype.kind == "f"]
    # fsdp over 4 devices instead of 8 sums in another order: log-prob sums of ~60 agree to ~2e-6 relative
    np.testing.assert_allclose(tables[2][numeric].to_numpy(), tables[1][numeric].to_numpy(), rtol=1e-5, atol=1e-5)
    assert caches[2].index.tolist() == list(range(9))
    np.testing.assert_allclose(caches[2].response(), caches[1].response(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(caches[2].gate(), caches[1].gate(), rtol=1e-5, atol=1e-5)


def test_a_host_missing_its_data_file_stops_every_process_with_its_name(model_dir, tmp_path):
    """Process 1's copy of the data is missing: both processes exit with an error that names the
    process, its host and the file (process 0 does not wait for a peer that is gone)."""
    import socket
    import time

    data = _pairs(tmp_path / "pairs.jsonl", 4)
    logs = tmp_path / "logs"
    logs.mkdir()

    def argv(i):
        return ["score", "--policy", str(model_dir), "--reference", "", "--sample", "0", "--strategy", "fsdp",
                "--data", str(data if i == 0 else tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out")]

    t0 = time.time()
    assert processes.run(argv, n=2, devices=4, timeout=120, logs=logs) == [2, 2], processes.tails(logs, 2)
    assert time.time() - t0 < 90
    for i in (0, 1):
        text = (logs / f"process{i}.log").read_text()
        assert f"failed on 1 of 2 processes: process 1 on {socket.gethostname()}: " in text, text[-2000:]
        assert "missing.jsonl: no such file" in text and "Traceback" not in text


def test_processes_that_disagree_on_the_process_count_stop(model_dir, tmp_path):
    """Process 1 says there are 3 processes, the coordinator (process 0) 2: both stop with an error
    naming the mismatch (the runtime alone would run the job with 2)."""
    import subprocess
    import sys

    logs = tmp_path / "logs"
    logs.mkdir()
    port = processes.free_port()
    argv = [sys.executable, "-m", "rmjax.cli", "score", "--policy", str(model_dir), "--data", "x.jsonl"]
    procs = []
    try:
        for i, n in ((0, 2), (1, 3)):
            env = dict(processes.process_env(i, 2, port, 4), RMJAX_NUM_PROCESSES=str(n))
            procs.append(subprocess.Popen(argv, env=env, stdout=open(logs / f"process{i}.log", "w"),  # noqa: SIM115
                                          stderr=subprocess.STDOUT))
        try:
            codes = [p.wait(timeout=120) for p in procs]
        except subprocess.TimeoutExpired:
            raise AssertionError("processes still running after 120 s" + processes.tails(logs, 2)) from None
    finally:
        processes.stop(procs)
    assert codes == [2, 2], processes.tails(logs, 2)
    for i in (0, 1):
        assert ("failed on 1 of 2 processes: process 1 on" in (logs / f"process{i}.log").read_text()
                and "RMJAX_NUM_PROCESSES=3 here, but the job that process 0 started has 2 processes"
                in (logs / f"process{i}.log").read_text()), processes.tails(logs, 2)


def test_a_job_that_cannot_form_is_a_clear_error(tmp_path):
    """A bad process id fails at once; a process whose coordinator never answers gives up after
    RMJAX_INIT_TIMEOUT with the address in the message (and its process is gone)."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "rmjax.cli", "score", "--policy", "p", "--data", str(tmp_path / "none.jsonl")]
    env = processes.process_env(3, 2, processes.free_port(), 1)
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "RMJAX_PROCESS_ID=3 with RMJAX_NUM_PROCESSES=2" in out.stderr
    port = processes.free_port()  # nothing listens there: process 1 waits for a coordinator that never comes
    env = dict(processes.process_env(1, 2, port, 1), RMJAX_INIT_TIMEOUT="3")
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"could not join the job at RMJAX_COORDINATOR=127.0.0.1:{port} within 3s" in out.stderr


def _pairs(path, n):
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Question {i}: {'why ' * (i % 7)}?",
                                        "chosen": f"Because {i}.", "rejected": "No" + "!" * (i % 5)}) + "\n"
                            for i in range(n)))
    return path


def _score(tmp_path, argv, name, n, *extra):
    """``rmjax score`` (argv without --out) on n processes into tmp_path/name; its scores table."""
    import pandas as pd

    logs = tmp_path / f"{name}_logs"
    logs.mkdir(exist_ok=True)
    codes = processes.run([*argv, "--out", str(tmp_path / name), *extra], n=n, devices=8 // n, timeout=300,
                          logs=logs)
    assert codes == [0] * n, processes.tails(logs, n)
    return pd.read_parquet(tmp_path / name / "scores.parquet")


@pytest.mark.slow
def test_global_mesh_scoring_and_kill_9_of_one_process(model_dir, tmp_path):
    """(1) --mesh-scope global: one 8-device mesh over both processes, every shard scored by both
    (each process feeding its own devices' rows), rows written once by process 0 = one process.
    (2) kill -9 of one process mid-run, then every process killed and the job restarted: the run
    completes with every row once and the values of an uninterrupted run."""
    import signal
    import time

    data = _pairs(tmp_path / "pairs.jsonl", 24)  # 12 shards of 2
    argv = ["score", "--policy", str(model_dir), "--reference", "", "--sample", "0", "--data", str(data),
            "--shard-size", "2", "--strategy", "fsdp", "--no-progress"]

    def run(name, n, *extra):
        return _score(tmp_path, argv, name, n, *extra)

    ref = run("one", 1)
    numeric = [c for c in ref.columns if ref[c].dtype.kind == "f"]
    together = run("global", 2, "--mesh-scope", "global")
    assert "mesh fsdp=8 (fsdp) over every process's devices" in (tmp_path / "global_logs" / "process1.log").read_text()
    assert together["id"].tolist() == ref["id"].tolist() == [f"p{i}" for i in range(24)]
    np.testing.assert_allclose(together[numeric].to_numpy(), ref[numeric].to_numpy(), rtol=1e-5, atol=1e-5)

    out, logs = tmp_path / "killed", tmp_path / "killed_logs"
    logs.mkdir()
    procs = processes.start([*argv, "--out", str(out)], n=2, devices=4, logs=logs)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(scan_shards(out)) < 2:
            assert all(p.poll() is None for p in procs), processes.tails(logs, 2)
            time.sleep(0.05)
        assert procs[1].poll() is None, "finished before it could be killed; the test needs more shards"
        os.kill(procs[1].pid, signal.SIGKILL)
    finally:
        processes.stop(procs)  # the survivor cannot finish without its peer: the job is restarted whole
    done_before = len(scan_shards(out))
    assert done_before < 12
    resumed = run("killed", 2)
    assert resumed["id"].tolist() == [f"p{i}" for i in range(24)]  # nothing lost, nothing twice
    np.testing.assert_allclose(resumed[numeric].to_numpy(), ref[numeric].to_numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [  # fsdp: both modes above
    "fsdp_tp", pytest.param("dp", marks=pytest.mark.skipif(
        not os.environ.get("RMJAX_TEST_MULTIPROCESS_TRAIN"),
        reason="about 30 s on 2 cores; set RMJAX_TEST_MULTIPROCESS_TRAIN=1 to run it"))])
def test_two_processes_score_as_one_under_each_strategy(model_dir, tmp_path, strategy):
    """Both scoring modes under dp and fsdp_tp: 2 processes = 1 process, each row once, in order."""
    data = _pairs(tmp_path / "pairs.jsonl", 11)
    argv = ["score", "--policy", str(model_dir), "--reference", "", "--sample", "0", "--data", str(data),
            "--shard-size", "3", "--strategy", strategy, "--no-progress"]
    tables = {name: _score(tmp_path, argv, name, n, *extra)
              for name, n, extra in (("one", 1, []), ("process", 2, []), ("global", 2, ["--mesh-scope", "global"]))}
    numeric = [c for c in tables["one"].columns if tables["one"][c].dtype.kind == "f"]
    for name in ("process", "global"):
        assert tables[name]["id"].tolist() == [f"p{i}" for i in range(11)], name
        np.testing.assert_allclose(tables[name][numeric].to_numpy(), tables["one"][numeric].to_numpy(),
                                   rtol=1e-5, atol=1e-5, err_msg=name)
