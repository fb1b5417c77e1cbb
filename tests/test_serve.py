"""`rmjax serve` on tiny checkpoints, as a real server process on 127.0.0.1: rewards equal `rmjax score`
on the same records (an RM, an implicit RM and a judge) whatever batch they land in, an OpenRLHF
client's request, 64 concurrent clients without a compile after the warm-up, bad input answered with
4xx while the server keeps serving, a client killed mid-request, SIGTERM finishing cleanly."""
import concurrent.futures
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

from hf_models import save_tiny_checkpoint
from processes import free_port
from rmjax.cli import main
from rmjax.data.records import record_from_dict

ROOT = Path(__file__).resolve().parents[1]
BETA = 0.5
RECORDS = [{"id": f"ex{i}", "prompt": f"Question {i}: what is {'very ' * i}good?", "chosen": f"Kindness {i}.",
            "rejected": "Power" + "!" * i} for i in range(6)]
RECORDS.append({"id": "shared", "prompt": "Question 1: what is very good?", "chosen": "Honesty.",
                "rejected": "Gold."})  # the same prompt as ex1 (one tree when they share a batch)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve_models")
    save_tiny_checkpoint(base / "policy", "llama_gqa_tied", seed=0)
    save_tiny_checkpoint(base / "reference", "llama_gqa_tied", seed=1)
    save_tiny_checkpoint(base / "rm", "llama_gqa_tied", head="seqcls", seed=2)
    return base


def serve_args(models, port, *extra):
    return ["serve", "--policy", str(models / "policy"), "--reference", str(models / "reference"), "--rm",
            str(models / "rm"), "--judge", str(models / "policy"), "--beta", str(BETA), "--max-length", "64",
            "--batch-tokens", "256", "--port", str(port), "batch.min_row_length=128", *extra]


def start_server(argv, log: Path, env=None, timeout=600):
    """``rmjax serve`` in a process of its own; returns (process, base URL) once /health answers."""
    port = argv[argv.index("--port") + 1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "rmjax.cli", *argv], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the server did not start in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    proc, url = start_server(serve_args(models, free_port()), log)
    yield url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def scored(models, tmp_path_factory):
    """`rmjax score` on the records with the server's models: its table, indexed by id."""
    d = tmp_path_factory.mktemp("serve_score")
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert main(["score", "--data", str(d / "pairs.jsonl"), "--policy", str(models / "policy"), "--reference",
                 str(models / "reference"), "--rm", str(models / "rm"), "--judge", str(models / "policy"),
                 "--sample", "0", "--beta", str(BETA), "--max-length", "64", "--out", str(d / "out"),
                 "--no-progress"]) == 0
    return pd.read_parquet(d / "out" / "scores.parquet").set_index("id")


def numeric(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, float)}


def test_score_endpoint_equals_rmjax_score_in_any_batch(server, scored):
    """The server's rows equal `rmjax score`'s (every RM, implicit-reward and judge column, 1e-5):
    all records in one request, one per request from 7 threads at once, and in a shuffled order."""
    columns = [c for c in scored.columns if scored[c].dtype.kind == "f"]
    assert any(c.startswith("rm_") for c in columns) and any(c.startswith("reward_") for c in columns)
    assert any(c.startswith("judge_") for c in columns)

    def check(rows):
        for row in rows:
            expected = scored.loc[row["id"]]
            for c in columns:
                assert row[c] == pytest.approx(float(expected[c]), abs=1e-5), (row["id"], c)

    whole = requests.post(f"{server}/score", json={"records": RECORDS}, timeout=60)
    assert whole.status_code == 200, whole.text
    whole = whole.json()
    check(whole["results"])
    assert [r["id"] for r in whole["results"]] == [r["id"] for r in RECORDS]
    first = whole["rewards"][0]
    assert first["rm"] == [whole["results"][0]["rm_chosen"], whole["results"][0]["rm_rejected"]]
    assert first["implicit"] == [whole["results"][0]["reward_chosen"], whole["results"][0]["reward_rejected"]]
    with concurrent.futures.ThreadPoolExecutor(len(RECORDS)) as pool:
        alone = list(pool.map(lambda r: requests.post(f"{server}/score", json={"records": [r]}, timeout=60).json(),
                              RECORDS))
    check([a["results"][0] for a in alone])
    shuffled = random.Random(0).sample(RECORDS, len(RECORDS))
    check(requests.post(f"{server}/score", json={"records": shuffled}, timeout=60).json()["results"])


def chatml(prompt: str, reply: str | None = None) -> str:
    """The tiny checkpoints' ChatML rendering: the prompt with the generation prompt, or the whole text."""
    text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    return text if reply is None else text + f"{reply}<|im_end|>\n"


def openrlhf_payload(records):
    """What OpenRLHF's remote reward function posts: decoded full texts, their prompts, labels."""
    queries, prompts = [], []
    for r in records:
        for side in ("chosen", "rejected"):
            queries.append(chatml(r["prompt"], r[side]))
            prompts.append(chatml(r["prompt"]))
    return {"query": queries, "prompts": prompts, "labels": [""] * len(queries)}


def test_openrlhf_client_gets_rewards_of_the_full_texts(server, scored):
    """OpenRLHF's remote RM request (``requests.post(url, json={"query", "prompts", "labels"})``) gets
    {"rewards", "scores", "extra_logs"}: the RM's reward of each full text (equal to `rmjax score` on
    the record), and the implicit reward beside it in extra_logs."""
    payload = openrlhf_payload(RECORDS)
    response = requests.post(f"{server}/get_reward", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    out = response.json()
    assert set(out) == {"rewards", "scores", "extra_logs"} and out["scores"] == out["rewards"]
    expected_rm = [float(scored.loc[r["id"]][f"rm_{s}"]) for r in RECORDS for s in ("chosen", "rejected")]
    expected_implicit = [float(scored.loc[r["id"]][f"reward_{s}"]) for r in RECORDS for s in ("chosen", "rejected")]
    np.testing.assert_allclose(out["rewards"], expected_rm, atol=1e-5)
    np.testing.assert_allclose(out["extra_logs"]["implicit"], expected_implicit, atol=1e-5)
    # without prompts a reward model still scores each text (an implicit reward needs them: tested below)
    bare = requests.post(f"{server}/get_reward", json={"query": payload["query"][:2]}, timeout=60)
    assert bare.status_code == 200
    np.testing.assert_allclose(bare.json()["rewards"], expected_rm[:2], atol=1e-5)


def compiled(server) -> int:
    health = requests.get(f"{server}/health", timeout=10).json()
    return health["programs_compiled"] + health["cache_hits"]


def test_64_concurrent_clients_every_reward_as_alone_no_compile(server):
    """64 clients x 20 requests, each of 1-3 texts drawn at random: every request answered, every
    reward equal to the text's reward requested alone, and nothing compiled after the warm-up."""
    payload = openrlhf_payload(RECORDS)
    texts = list(zip(payload["query"], payload["prompts"]))
    alone = {}
    for q, p in texts:
        alone[q] = requests.post(f"{server}/get_reward", json={"query": [q], "prompts": [p]},
                                 timeout=60).json()["rewards"][0]
    before = compiled(server)
    failures, answered = [], []

    def client(seed):
        rng = random.Random(seed)
        with requests.Session() as session:
            for _ in range(20):
                chosen = rng.sample(texts, rng.randint(1, 3))
                r = session.post(f"{server}/get_reward", json={"query": [q for q, _ in chosen],
                                                               "prompts": [p for _, p in chosen]}, timeout=120)
                if r.status_code != 200:
                    failures.append(r.text)
                    continue
                answered.append(1)
                for (q, _), reward in zip(chosen, r.json()["rewards"]):
                    if abs(reward - alone[q]) > 1e-5:
                        failures.append(f"{reward} != {alone[q]} alone")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not failures, failures[:5]
    assert len(answered) == 64 * 20
    assert compiled(server) == before
    metrics = requests.get(f"{server}/metrics", timeout=10).text
    shared = [line for line in metrics.splitlines() if line.startswith("rmjax_batch_requests_count")]
    total = [line for line in metrics.splitlines() if line.startswith("rmjax_batch_requests_sum")]
    assert float(total[0].split()[-1]) > float(shared[0].split()[-1]), "no batch held two requests"
    assert 'rmjax_requests_total{endpoint="/get_reward",status="200"}' in metrics
    assert 'rmjax_request_latency_seconds{quantile="0.99"}' in metrics


def test_bad_input_gets_4xx_with_the_reason_and_the_server_keeps_serving(server):
    url = f"{server}/get_reward"
    q, p = chatml("Hi", "Hello!"), chatml("Hi")
    cases = [
        (requests.post(url, data=b'{"query": ["a"', timeout=30), 400, "not JSON"),
        (requests.post(url, data=b'{"query": ["\xff\xfe"]}', timeout=30), 400, "not UTF-8"),
        (requests.post(url, json={"prompts": [p]}, timeout=30), 422, "'query' is missing"),
        (requests.post(url, json={"query": q}, timeout=30), 200, ""),  # one text given as a string
        (requests.post(url, json={"query": [1, 2]}, timeout=30), 422, "list of strings"),
        (requests.post(url, json={"query": [q, q], "prompts": [p]}, timeout=30), 422, "one prompt per query"),
        (requests.post(url, json={"query": [p], "prompts": [p]}, timeout=30), 422, "response is empty"),
        (requests.post(url, json={"query": [q], "prompts": [chatml("Other")]}, timeout=30), 422, "does not begin"),
        (requests.post(url, json={"query": [chatml("Hi " * 80, "Hello!")], "prompts": [chatml("Hi " * 80)]},
                       timeout=30), 422, "max_length=64"),
        (requests.post(url, data=b'{"query": ["' + b"x" * (10 << 20) + b'"]}', timeout=60), 413, "limit"),
        (requests.post(f"{server}/score", json={"records": [{"prompt": "Hi", "chosen": "", "rejected": "x"}]},
                       timeout=30), 422, "records[0]"),
        (requests.post(f"{server}/score", json={"records": [{"prompt": "Hi", "response": "x"}]}, timeout=30), 422,
         "pair records"),  # this server runs a judge, which compares pairs
        (requests.post(f"{server}/score", json={"items": []}, timeout=30), 422, "'records'"),
    ]
    for response, status, reason in cases:
        assert response.status_code == status, (reason, response.text)
        if status != 200:
            assert reason in response.json()["detail"], response.text
    good = requests.post(url, json={"query": [q], "prompts": [p]}, timeout=30)
    assert good.status_code == 200 and len(good.json()["rewards"]) == 1


CLIENT = """
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
body = b'{"query": ["' + b"x" * 100000 + b'"]}'
head = b"POST /get_reward HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\n\\r\\n"
if sys.argv[2] == "half":  # killed half-way through its body
    s.sendall(head % len(body) + body[:50000])
else:  # killed while its request is being scored
    s.sendall(head % len(body) + body)
print("sent", flush=True)
time.sleep(60)
"""


def test_client_killed_mid_request_leaves_the_server_serving(server):
    port = server.rsplit(":", 1)[1]
    for mode in ("half", "whole"):
        client = subprocess.Popen([sys.executable, "-c", CLIENT, port, mode], stdout=subprocess.PIPE)
        assert client.stdout.readline().strip() == b"sent"
        client.send_signal(signal.SIGKILL)
        client.wait()
    payload = openrlhf_payload(RECORDS[:1])
    response = requests.post(f"{server}/get_reward", json=payload, timeout=60)
    assert response.status_code == 200 and len(response.json()["rewards"]) == 2
    assert requests.get(f"{server}/health", timeout=10).json()["status"] == "ok"


def test_token_health_and_graceful_stop(models, tmp_path):
    """With RMJAX_SERVE_TOKEN set every endpoint but /health wants the bearer token; /health names
    the models and devices; SIGTERM finishes the requests in flight and exits 0."""
    port = free_port()
    proc, url = start_server(["serve", "--rm", str(models / "rm"), "--max-length", "64", "--port", str(port),
                              "--max-wait-ms", "300", "--batch-tokens", "128", "batch.min_row_length=64"],
                             tmp_path / "server.log", env={"RMJAX_SERVE_TOKEN": "s3cret"})
    try:
        health = requests.get(f"{url}/health", timeout=10).json()
        assert health["models"]["rm"].endswith("rm") and health["devices"] and health["dtype"] == "float32"
        payload = {"query": [chatml("Hi", "Hello!")], "prompts": [chatml("Hi")]}
        assert requests.post(f"{url}/get_reward", json=payload, timeout=30).status_code == 401
        assert requests.get(f"{url}/metrics", timeout=30).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert requests.post(f"{url}/get_reward", json=payload, headers=auth, timeout=30).status_code == 200
        # requests waiting in the engine's queue (300 ms) when SIGTERM arrives are still answered
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(requests.post, f"{url}/get_reward", json=payload, headers=auth, timeout=60)
                       for _ in range(4)]
            deadline = time.time() + 30
            while requests.get(f"{url}/health", timeout=10).json()["queue"] == 0 and time.time() < deadline:
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            assert all(f.result().status_code == 200 for f in futures)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/health", timeout=5)


def test_binds_loopback_by_default_and_rows_hold_the_longest_tree():
    from rmjax import config as rconfig
    from rmjax.errors import RmjaxError
    from rmjax.jobs.serve import ServeConfig, ladder
    assert ServeConfig().host == "127.0.0.1"
    assert ladder(rconfig.load(ServeConfig, None, ["data.max_length=300"])) == (128, 192, 256, 384, 512)
    assert ladder(rconfig.load(ServeConfig, None, ["data.max_length=300", "model.judge=j"]))[-1] == 2048
    with pytest.raises(RmjaxError, match="judge tree"):
        ladder(rconfig.load(ServeConfig, None, ["data.max_length=300", "model.judge=j", "batch.row_length=1024"]))


def test_record_from_dict_names_the_request_field():
    rec = record_from_dict({"prompt": "Hi", "chosen": "a", "rejected": "b"}, 3, "records[3]")
    assert rec.kind == "pair" and rec.index == 3 and rec.id == "records[3]"
    with pytest.raises(Exception, match=r"records\[4\]: field 'rejected' is missing"):
        record_from_dict({"prompt": "Hi", "chosen": "a"}, 4, "records[4]")
    with pytest.raises(Exception, match=r"records\[5\]: a record is a JSON object"):
        record_from_dict(["Hi"], 5, "records[5]")


@pytest.mark.parametrize("layout,strategy", [("llama31_untied", "fsdp"), ("qwen3", "none"), ("multi_objective", "none"),
                                             ("armorm", "dp")])
def test_get_reward_of_released_layouts_equals_their_own_forward(layout, strategy, tmp_path):
    """/get_reward's engine on full texts rendered by the model's own chat template (as an RL trainer
    sends them) gives each released layout's reward from its own forward (transformers, or the
    authors' head): an untied Llama-3.1 classifier, Qwen3 (think block), a multi-objective head (its
    objectives in extra_logs) and ArmoRM's gate, whose gating token is found in the prompt's tokens;
    several texts per prompt (one tree) and several requests per batch; on one device, or sharded
    over the 8 test devices (fsdp; dp: the rows split). Queued requests are answered before the
    engine stops."""
    from transformers import AutoTokenizer

    from released_rms import build, records_for
    from rmjax import config as rconfig
    from rmjax.jobs.serve import ServeConfig, build_engine

    reward = build(layout, tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    queries, prompts, want = [], [], []
    for r in records_for(released_family(layout)):
        if "chosen" not in r:
            continue
        messages = r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}]
        for reply in (r["chosen"], r["rejected"]):
            if not isinstance(reply, str):
                continue
            full = messages + [{"role": "assistant", "content": reply}]
            queries.append(tok.apply_chat_template(full, tokenize=False))
            prompts.append(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
            want.append(reward(full))
    assert len(queries) >= 4
    config = rconfig.load(ServeConfig, None, [f"model.rm={tmp_path / 'model'}", "data.max_length=256",
                                              "batch.min_row_length=64", "batch.batch_tokens=512",
                                              f"mesh.strategy={strategy}"])
    engine, _ = build_engine(config)
    engine.start()
    jobs = [engine.texts(queries[i:i + 3], prompts[i:i + 3]) for i in range(0, len(queries), 3)]
    futures = [engine.submit(job) for job in jobs]
    engine.stop()  # the queued jobs are scored first
    got, objectives = [], []
    for job, future in zip(jobs, futures):
        rewards, extra = engine.text_rewards(job, future.result(timeout=0))
        got += rewards
        objectives += [dict(zip(extra, values)) for values in zip(*extra.values())] if extra else [{}] * len(rewards)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    if layout == "multi_objective":
        assert set(objectives[0]) == {"rm[helpfulness]", "rm[honesty]", "rm[brevity]"}
        np.testing.assert_allclose([np.mean(list(o.values())) for o in objectives], want, atol=1e-4, rtol=1e-4)
    with pytest.raises(Exception, match="shutting down"):
        engine.submit(jobs[0])


def released_family(layout: str) -> str:
    from released_rms import LAYOUTS
    return LAYOUTS[layout][0]


def test_a_full_queue_gets_503_and_the_queued_requests_are_answered(models):
    """The queue is bounded: past --max-queue waiting requests a request gets 503 with Retry-After (not a
    growing wait); the ones queued are answered once the engine runs."""
    import uvicorn

    from rmjax import config as rconfig
    from rmjax.jobs.serve import ServeConfig, build_engine
    from rmjax.serving.app import build_app

    config = rconfig.load(ServeConfig, None, [f"model.rm={models / 'rm'}", "data.max_length=64",
                                              "batch.min_row_length=64", "batch.max_queue=1"])
    engine, describe = build_engine(config)  # not started yet: requests wait in its queue
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(engine, describe=describe), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        payload = {"query": [chatml("Hi", "Hello!")], "prompts": [chatml("Hi")]}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(requests.post, f"{url}/get_reward", json=payload, timeout=120)
            while requests.get(f"{url}/health", timeout=10).json()["queue"] < 1 and time.time() < deadline:
                time.sleep(0.01)
            refused = requests.post(f"{url}/get_reward", json=payload, timeout=30)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "1 requests are queued" in refused.json()["detail"]
            engine.start()
            answered = waiting.result()
        assert answered.status_code == 200 and len(answered.json()["rewards"]) == 1
    finally:
        server.should_exit = True
        thread.join(60)
