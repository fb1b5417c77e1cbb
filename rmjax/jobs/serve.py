"""The serving job (``rmjax serve``): a reward model behind HTTP for RL trainers, on the engine of
``rmjax score`` (``rmjax.serving``).

    config = rmjax.config.load(ServeConfig, None, ["model.rm=/path/rm", "port=5000"])
    run(config)                      # serves until SIGINT / SIGTERM, then finishes what is in flight

Default: the implicit RM rmjax ships (SmolLM2-135M-Instruct + its DPO LoRA adapter against
SmolLM2-135M-Instruct), as ``rmjax score``'s default. Every program the server will run (the
ladder of row shapes x the models) is compiled before it listens, so no request waits for XLA.
"""
from __future__ import annotations

import dataclasses
import os
import signal

from rmjax import compilation, distributed
from rmjax import sharding as shd
from rmjax.config import knob, section
from rmjax.data.batching import BUCKETS
from rmjax.errors import RmjaxError
from rmjax.jobs.score import ModelRoles, default_roles, load_slots
from rmjax.scoring import bulk
from rmjax.sections import MeshSection, RenderSection
from rmjax.serving.engine import Engine

TOKEN_ENV = "RMJAX_SERVE_TOKEN"


@dataclasses.dataclass(kw_only=True)
class ServeBatch:
    """How requests become engine batches."""

    row_length: int = knob(0, "the longest packed row: a prompt with all its responses must fit (0: the smallest "
                              "power of two >= data.max_length, 4x that with a judge)")
    min_row_length: int = knob(128, "the shortest row of the ladder (row lengths step by 1.5x from here to "
                                    "row_length)")
    batch_tokens: int = knob(8192, "tokens per engine batch (rows x row length); requests that arrive together "
                                   "share one")
    max_wait_ms: float = knob(5.0, "how long the oldest request waits for others to share its batch")
    max_queue: int = knob(256, "requests waiting at most; past it a request gets 503")

    def check(self) -> list[tuple[bool, str]]:
        return [(self.row_length >= 0 and self.min_row_length >= 8,
                 "batch.row_length must be >= 0 and batch.min_row_length >= 8"),
                (self.batch_tokens > 0 and self.max_queue > 0 and self.max_wait_ms >= 0,
                 "batch.batch_tokens and batch.max_queue must be positive, batch.max_wait_ms >= 0")]


@dataclasses.dataclass(kw_only=True)
class ServeConfig:
    model: ModelRoles = section(ModelRoles)
    data: RenderSection = section(RenderSection, max_length=2048, over_length="drop")
    batch: ServeBatch = section(ServeBatch)
    mesh: MeshSection = section(MeshSection)
    beta: float = knob(1.0, "implicit reward: beta x (log pi - log pi_ref)")
    reduction: str = knob("sum", "the sequence log-prob in the implicit reward: sum, or mean (length-normalised)",
                          ("sum", "mean"))
    reference_template: str = knob("model", "the reference's rendering of /score records, as data.template")
    host: str = knob("127.0.0.1", "address to listen on (0.0.0.0: every interface; give it explicitly)")
    port: int = knob(5000, "port to listen on")
    max_body_mb: float = knob(8.0, "the largest request body, in MB (413 past it)")
    max_texts: int = knob(4096, "the most texts (/get_reward) or records (/score) in one request")

    def check(self) -> list[tuple[bool, str]]:
        return [(0 < self.port < 65536, "port must be in 1..65535"), (self.max_body_mb > 0, "max_body_mb must be > 0")]


def ladder(config: ServeConfig) -> tuple[int, ...]:
    """The packed row lengths: the bucket ladder's (1.5x steps) from batch.min_row_length up to the
    longest row, which ends it."""
    b, m = config.batch, config.model
    # a judge's tree holds both candidate orders (each up to 2 x max_length: the judge prompt shows both
    # responses), their shared beginning once
    need = config.data.max_length * (4 if m.judge else 1)
    longest = b.row_length or 1 << (need - 1).bit_length()
    if longest < need:
        raise RmjaxError(f"batch.row_length={longest} is shorter than {need} tokens, the longest "
                         f"{'judge tree (4 x data.max_length)' if m.judge else 'sequence (data.max_length)'}: "
                         "it must fit a row")
    return (*(n for n in BUCKETS if min(b.min_row_length, longest) <= n < longest), longest)


def build_engine(config: ServeConfig):
    """The models loaded and the engine over them (not yet warmed up or started)."""
    import jax

    m = config.model
    policy, reference = default_roles(m, m.policy, m.reference)
    if not policy and reference:
        raise RmjaxError("a reference (--reference) needs a policy (--policy)")
    m = dataclasses.replace(m, policy=policy, reference=reference)
    mesh = config.mesh.mesh(devices=distributed.own_devices()) if config.mesh.strategy != "none" else None
    strategy = config.mesh.strategy if mesh is not None else "dp"
    rungs = ladder(config)
    s = bulk.ScoreSettings(beta=config.beta, reduction=config.reduction, template=config.data.template,
                           reference_template=config.reference_template, max_length=config.data.max_length,
                           over_length=config.data.over_length, pack_length=rungs[-1],
                           batch_tokens=max(config.batch.batch_tokens, rungs[-1]), buckets=BUCKETS, ladder=rungs)
    scorer = bulk.Scorer(load_slots(m, mesh, strategy), s, mesh=mesh, strategy=config.mesh.strategy)
    engine = Engine(scorer, beta=config.beta, reduction=config.reduction, max_wait_s=config.batch.max_wait_ms / 1000,
                    max_queue=config.batch.max_queue)
    describe = {"models": {sl.role: str(sl.loaded.source) for sl in scorer.slots}, "dtype": m.dtype,
                "param_dtype": m.param_dtype,
                "devices": [str(d) for d in (mesh.devices.flat if mesh is not None else jax.local_devices()[:1])],
                "mesh": shd.describe(mesh) if mesh is not None else "single device", "row_lengths": list(rungs),
                "batch_tokens": s.batch_tokens, "max_length": s.max_length}
    return engine, describe


def run(config: ServeConfig) -> None:
    """Load, warm up (compile every shape), serve until interrupted."""
    import time

    import uvicorn

    # the web framework loads only when a server starts (every rmjax command imports this module)
    from rmjax.serving.app import build_app

    engine, describe = build_engine(config)
    t0 = time.perf_counter()
    shapes = engine.warm_up()
    bulk.log(f"compiled {shapes} (program, shape) pairs in {time.perf_counter() - t0:.1f} s "
             f"({compilation.stats()['programs_compiled']} programs, {compilation.stats()['cache_hits']} from the cache)")
    token = os.environ.get(TOKEN_ENV) or None
    app = build_app(engine.start(), describe=describe, token=token, max_body_bytes=int(config.max_body_mb * 2 ** 20),
                    max_texts=config.max_texts)
    bulk.log(f"serving {', '.join(f'{r}={n}' for r, n in describe['models'].items())} on "
             f"http://{config.host}:{config.port} (POST /get_reward, POST /score, GET /health, GET /metrics)"
             + ("; bearer token required" if token else ""))
    # uvicorn finishes the requests in flight on SIGINT / SIGTERM, then raises the signal again for the
    # handler it found: a graceful stop is a normal end of the command (exit 0), not a kill
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=60)
    bulk.log(f"stopped after {engine.stats['batches']} batches ({engine.stats['tokens']} tokens)")
