"""The one training loop every trainer in rmjax runs (reward models, RLOO, SAEs, ArmoRM's gate), and its hooks.

    state = fit(state, step, start=0, end=steps, hooks=[MetricsHook(log, every=10), CheckpointHook(...), ...])

``step(state, s) -> (state, metrics)`` is the job's own update for step ``s`` (it draws that step's
batch, so a resumed run draws the same ones); the loop calls it for s = start .. end-1 and, after
each step, every hook with the number of steps done. Hooks do everything else:

    MetricsHook      every n steps: the step's metrics to ``MetricsLog`` (metrics.jsonl + TensorBoard)
    EvalHook         every n steps (and at the last): an evaluation, logged as "eval"
    CheckpointHook   every n steps (and at the last): a checkpoint (orbax, or any save function)
    ProgressHook     a tqdm bar
    Every(n, fn)     fn(step, state, metrics) every n steps and at the last

``MetricsLog`` keeps one metrics.jsonl + TensorBoard log per run; on resume it drops the lines past
the restored step, so a killed and resumed run logs each step once.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rmjax import distributed

Step = Callable[[Any, int], tuple[Any, dict]]


class Hook:
    """Observes the loop; every method is optional."""

    def begin(self, start: int, end: int, state: Any) -> None:
        pass

    def after_step(self, step: int, state: Any, metrics: dict) -> None:
        pass

    def end(self, state: Any) -> None:
        pass


def due(step: int, every: int, end: int) -> bool:
    """Every ``every`` steps, and at the last one."""
    return (every > 0 and step % every == 0) or step == end


def fit(state: Any, step: Step, *, start: int, end: int, hooks: tuple[Hook, ...] | list[Hook] = ()) -> Any:
    """Run ``step`` for steps start .. end-1 with ``hooks``; returns the final state."""
    for hook in hooks:
        hook.begin(start, end, state)
    for s in range(start, end):
        state, metrics = step(state, s)
        for hook in hooks:
            hook.after_step(s + 1, state, metrics)
    for hook in hooks:
        hook.end(state)
    return state


class MetricsLog:
    """metrics.jsonl + TensorBoard; on resume, lines past the restored step are dropped."""

    def __init__(self, run_dir: Path, resume_step: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        if self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        self.tb = None
        if distributed.is_main_process():
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)

    def read(self, step: int, kind: str) -> dict:
        """The values logged at ``step`` as ``kind`` ({} if none), e.g. a resumed run's start evaluation."""
        if self.path.exists():
            for ln in self.path.read_text().splitlines():
                entry = json.loads(ln) if ln else {}
                if entry.get("step") == step and entry.get("kind") == kind:
                    return {k: v for k, v in entry.items() if k not in ("step", "kind")}
        return {}

    def write(self, step: int, kind: str, values: dict) -> None:
        if not distributed.is_main_process():
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(f"{kind}/{k}", v, step)
        self.tb.flush()


class Every(Hook):
    """``fn(step, state, metrics)`` every ``every`` steps and at the last: the loop's end, or ``last``
    (a run's planned end, when the loop stops early)."""

    def __init__(self, every: int, fn: Callable[[int, Any, dict], None], last: int | None = None):
        self.every, self.fn, self.planned, self.last = every, fn, last, 0

    def begin(self, start: int, end: int, state: Any) -> None:
        self.last = self.planned if self.planned is not None else end

    def after_step(self, step: int, state: Any, metrics: dict) -> None:
        if due(step, self.every, self.last):
            self.fn(step, state, metrics)


class MetricsHook(Every):
    """The step's metrics (as floats; ``prepare`` may add to them) into ``log`` every ``every`` steps."""

    def __init__(self, log: MetricsLog, every: int, prepare: Callable[[int, dict], dict] | None = None):
        def write(step: int, state: Any, metrics: dict) -> None:
            values = {k: float(v) for k, v in metrics.items()}
            log.write(step, "train", prepare(step, values) if prepare else values)
        super().__init__(every, write)


class EvalHook(Every):
    """``evaluate(state) -> metrics`` every ``every`` steps, written to ``log`` as "eval" and kept in
    ``last_result``; ``after(step, state, metrics)`` (e.g. keep the best checkpoint) runs on each result.
    ``at_start``: also evaluate the state a fresh run starts from (step 0; not ``after``), kept in
    ``start_result`` — the untrained baseline."""

    def __init__(self, evaluate: Callable[[Any], dict], every: int, log: MetricsLog | None = None,
                 after: Callable[[int, Any, dict], None] | None = None, last: int | None = None,
                 at_start: bool = False):
        self.last_result: dict = {}
        self.start_result: dict = {}
        self.at_start, self.log, self.evaluate = at_start, log, evaluate

        def run(step: int, state: Any, _metrics: dict) -> None:
            self.last_result = evaluate(state)
            if log is not None:
                log.write(step, "eval", self.last_result)
            if after is not None:
                after(step, state, self.last_result)
        super().__init__(every, run, last)

    def begin(self, start: int, end: int, state: Any) -> None:
        super().begin(start, end, state)
        if self.at_start and start == 0:
            self.start_result = self.evaluate(state)
            if self.log is not None:
                self.log.write(0, "eval", self.start_result)


class CheckpointHook(Every):
    """``save(step, state)`` every ``every`` steps and at the last (``finish()`` at the end: e.g. wait
    for an asynchronous save)."""

    def __init__(self, save: Callable[[int, Any], Any], every: int, finish: Callable[[], Any] | None = None,
                 last: int | None = None):
        self.finish = finish
        super().__init__(every, lambda step, state, _metrics: save(step, state), last)

    def end(self, state: Any) -> None:
        if self.finish is not None:
            self.finish()


class ProgressHook(Hook):
    """A tqdm bar over the steps (on the main process); it reads no metric, so it never waits for a step."""

    def __init__(self, total: int, desc: str = "train", enabled: bool = True):
        self.total, self.desc, self.enabled, self.bar = total, desc, enabled, None

    def begin(self, start: int, end: int, state: Any) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, initial=start, desc=self.desc, unit="step", file=sys.stderr,
                        disable=not self.enabled or not distributed.is_main_process())

    def after_step(self, step: int, state: Any, metrics: dict) -> None:
        self.bar.update(1)

    def end(self, state: Any) -> None:
        self.bar.close()
