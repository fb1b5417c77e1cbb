"""The HTTP face of the serving engine (FastAPI on uvicorn):

    POST /get_reward   OpenRLHF's remote reward model: {"query": [full texts], "prompts": [their prompts]}
                       -> {"rewards": [...], "scores": [...], "extra_logs": {...}}
    POST /score        {"records": [records as `rmjax score --data` reads them]} -> `rmjax score`'s row per
                       record ("results") and each record's rewards per response ("rewards")
    GET  /health       models, dtype, devices, queue length, programs compiled
    GET  /metrics      Prometheus text: requests by endpoint and status, tokens, batch sizes, latency

Bad input is a 4xx whose ``detail`` names the field and the fix: 400 for a body that is not UTF-8 JSON,
413 past the body limit, 422 for a field of the wrong type, an empty response, a text past the length
limit; 503 when the queue is full; 401 without the bearer token when one is set.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import time

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.requests import ClientDisconnect

from rmjax import compilation
from rmjax.data.records import record_from_dict
from rmjax.errors import DataError
from rmjax.serving.engine import Engine, QueueFull

LATENCY_WINDOW = 10_000  # requests the latency percentiles are taken over


class _Metrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("rmjax_requests", "requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.tokens = Counter("rmjax_tokens", "tokens scored (prompt trees: each shared prompt once)",
                              registry=self.registry)
        self.texts = Counter("rmjax_responses", "responses scored", registry=self.registry)
        self.batch = Histogram("rmjax_batch_requests", "requests per engine batch",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        Gauge("rmjax_queue_length", "requests waiting for the engine",
              registry=self.registry).set_function(lambda: engine.queued)
        Gauge("rmjax_tokens_per_second", "tokens scored per second over the last minute",
              registry=self.registry).set_function(engine.tokens_per_second)
        Gauge("rmjax_programs_compiled", "programs compiled by this process (warm-up included)",
              registry=self.registry).set_function(lambda: compilation.stats()["programs_compiled"])
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self.registry.register(self)
        self._seen_batches = 0
        self.engine = engine

    def collect(self):  # the latency percentiles of the last requests (a Prometheus summary's quantiles)
        latency = GaugeMetricFamily("rmjax_request_latency_seconds",
                                    f"request latency percentiles over the last {LATENCY_WINDOW} scoring requests",
                                    labels=["quantile"])
        values = np.asarray(self.latencies, np.float64)
        for q in (0.5, 0.9, 0.99):
            latency.add_metric([str(q)], float(np.quantile(values, q)) if len(values) else float("nan"))
        yield latency

    def sync_batches(self) -> None:
        sizes = list(self.engine.batch_sizes)
        new = self.engine.stats["batches"] - self._seen_batches
        for n in sizes[len(sizes) - min(new, len(sizes)):]:
            self.batch.observe(n)
        self._seen_batches += new


def build_app(engine: Engine, *, describe: dict, token: str | None = None, max_body_bytes: int = 8 << 20,
              max_texts: int = 4096) -> FastAPI:
    """The app over a started engine; ``describe`` is what /health reports of the models."""
    metrics = _Metrics(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has finished the requests in flight; the engine's queue is empty by now
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="rmjax serve", lifespan=lifespan)

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    def authorised(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token: send 'Authorization: Bearer <RMJAX_SERVE_TOKEN>'",
                                headers={"WWW-Authenticate": "Bearer"})

    async def body_json(request: Request):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise HTTPException(413, f"the body is {int(length)} bytes, over the limit of {max_body_bytes} bytes "
                                     "(--max-body-mb): send fewer texts per request")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body_bytes:
                    raise HTTPException(413, f"the body is over the limit of {max_body_bytes} bytes (--max-body-mb): "
                                             "send fewer texts per request")
                chunks.append(chunk)
        except ClientDisconnect:
            raise HTTPException(400, "the client disconnected before the body was sent") from None
        raw = b"".join(chunks)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise HTTPException(400, f"the body is not UTF-8 (byte {e.start}): send JSON encoded as UTF-8") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise HTTPException(400, f"the body is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None

    def string_list(body: dict, field: str, required: bool = True) -> list[str] | None:
        value = body.get(field)
        if value is None:
            if required:
                raise HTTPException(422, f"field {field!r} is missing: a list of strings")
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise HTTPException(422, f"field {field!r} must be a list of strings, got {type(value).__name__}"
                                + ("" if not isinstance(value, list) else
                                   f" holding {sorted({type(v).__name__ for v in value})}"))
        if len(value) > max_texts:
            raise HTTPException(422, f"field {field!r} holds {len(value)} texts, more than {max_texts} (--max-texts)")
        return value

    async def run(job_of, *args):
        start = time.perf_counter()
        try:
            job = await asyncio.to_thread(job_of, *args)
            future = engine.submit(job)
        except DataError as e:
            raise HTTPException(422, str(e)) from None
        except QueueFull as e:
            raise HTTPException(503, f"{e}; retry shortly", headers={"Retry-After": "1"}) from None
        try:
            results = await asyncio.wrap_future(future)
        except DataError as e:
            raise HTTPException(422, str(e)) from None
        metrics.latencies.append(time.perf_counter() - start)
        metrics.tokens.inc(job.tokens)
        metrics.sync_batches()
        return job, results

    @app.post("/get_reward")
    async def get_reward(request: Request):
        authorised(request)
        body = await body_json(request)
        if not isinstance(body, dict):
            raise HTTPException(422, f"the body must be a JSON object with 'query' (and 'prompts'), got "
                                     f"{type(body).__name__}")
        queries = string_list(body, "query")
        prompts = string_list(body, "prompts", required=False)
        if prompts is not None and len(prompts) != len(queries):
            raise HTTPException(422, f"'prompts' holds {len(prompts)} texts for {len(queries)} queries: one prompt "
                                     "per query")
        if not queries:
            return {"rewards": [], "scores": [], "extra_logs": {}}
        job, results = await run(engine.texts, queries, prompts)
        rewards, extra = engine.text_rewards(job, results)
        metrics.texts.inc(len(rewards))
        return {"rewards": rewards, "scores": rewards, "extra_logs": extra}

    @app.post("/score")
    async def score(request: Request):
        authorised(request)
        body = await body_json(request)
        records = body.get("records") if isinstance(body, dict) else None
        if not isinstance(records, list):
            raise HTTPException(422, "the body must be a JSON object with 'records': a list of records in any layout "
                                     "rmjax score reads (e.g. {\"prompt\": ..., \"chosen\": ..., \"rejected\": ...})")
        if len(records) > max_texts:
            raise HTTPException(422, f"'records' holds {len(records)} records, more than {max_texts} (--max-texts)")
        try:
            parsed = [record_from_dict(r, i, f"records[{i}]") for i, r in enumerate(records)]
        except DataError as e:
            raise HTTPException(422, str(e)) from None
        if not parsed:
            return {"results": [], "rewards": []}
        job, results = await run(engine.records, parsed)
        rows = engine.record_rows(job, results)
        metrics.texts.inc(sum(len(r.responses) for r in parsed))
        return {"results": rows, "rewards": [record_rewards(row, rec.response_names) for row, rec in zip(rows, parsed)]}

    @app.get("/health")
    async def health():
        return {"status": "ok", **describe, "queue": engine.queued, "batches": engine.stats["batches"],
                **compilation.stats()}

    @app.get("/metrics")
    async def prometheus(request: Request):
        authorised(request)
        metrics.sync_batches()
        return Response(generate_latest(metrics.registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def record_rewards(row: dict, names: tuple[str, ...]) -> dict[str, list[float]]:
    """A record's rewards per response, by source: the RM ('rm'), the implicit reward ('implicit')."""
    out = {}
    for prefix, name in (("rm_", "rm"), ("reward_", "implicit")):
        if f"{prefix}{names[0]}" in row:
            out[name] = [row[f"{prefix}{n}"] for n in names]
    return out
