"""The one training loop and its hooks, on a counter: which steps each hook sees, the start evaluation,
a resumed loop, a metrics log that drops lines past the restored step."""
import json

from rmjax.train import trainer


def counting_step(state, s):
    return state + 1, {"loss": 10.0 - s}


def test_hooks_fire_every_n_steps_and_at_the_last():
    seen, saved = [], []
    evals = trainer.EvalHook(lambda state: {"value": state}, every=3, at_start=True)
    final = trainer.fit(0, counting_step, start=0, end=7, hooks=[
        trainer.Every(2, lambda step, state, m: seen.append((step, state, m["loss"]))),
        trainer.CheckpointHook(lambda step, state: saved.append(step), every=4, finish=lambda: saved.append("done")),
        evals])
    assert final == 7
    assert seen == [(2, 2, 9.0), (4, 4, 7.0), (6, 6, 5.0), (7, 7, 4.0)]
    assert saved == [4, 7, "done"]
    assert evals.start_result == {"value": 0} and evals.last_result == {"value": 7}


def test_a_resumed_loop_runs_the_remaining_steps_and_its_planned_last_step():
    steps, saved = [], []
    evals = trainer.EvalHook(lambda state: {"value": state}, every=100, at_start=True, last=9)
    trainer.fit(5, lambda st, s: (steps.append(s) or st + 1, {}), start=5, end=8, hooks=[
        trainer.CheckpointHook(lambda step, state: saved.append(step), every=100, last=9), evals])
    assert steps == [5, 6, 7]
    assert saved == [] and evals.start_result == {}  # 8 is not the planned last step; no start eval on resume
    trainer.fit(8, lambda st, s: (st + 1, {}), start=8, end=9, hooks=[
        trainer.CheckpointHook(lambda step, state: saved.append(step), every=100, last=9), evals])
    assert saved == [9] and evals.last_result == {"value": 9}


def test_metrics_log_keeps_lines_up_to_the_restored_step(tmp_path):
    log = trainer.MetricsLog(tmp_path, 0)
    trainer.fit(0, counting_step, start=0, end=4, hooks=[
        trainer.MetricsHook(log, 1), trainer.EvalHook(lambda s: {"value": s}, 2, log, at_start=True)])
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["kind"]) for x in lines] == [(0, "eval"), (1, "train"), (2, "train"), (2, "eval"),
                                                        (3, "train"), (4, "train"), (4, "eval")]
    resumed = trainer.MetricsLog(tmp_path, 2)
    kept = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["kind"]) for x in kept] == [(0, "eval"), (1, "train"), (2, "train"), (2, "eval")]
    assert resumed.read(0, "eval") == {"value": 0} and resumed.read(3, "train") == {}
