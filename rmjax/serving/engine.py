"""The scoring engine behind a server: requests encoded into prompt trees, batched dynamically onto
packed rows of a few fixed shapes, scored by ``rmjax.scoring.bulk.Scorer`` (the engine of
``rmjax score``), and the results handed back to each caller.

    engine = Engine(scorer, beta=1.0, reduction="sum")       # scorer.s.ladder: the row shapes
    engine.warm_up()                                          # compiles every shape before serving
    job = engine.texts(queries, prompts)                      # OpenRLHF's /get_reward texts -> a Job
    job = engine.records(records)                             # structured records -> a Job
    results = engine.submit(job).result()                     # {key: {role: stats}}

One worker thread owns the devices. It takes the oldest request, waits up to ``max_wait_s`` for
others while the batch has room (``batch_tokens``), and runs them together: texts or records that
share a prompt are one tree whatever request they came in, rows are packed to the ladder's shapes
(``batching.ladder_shapes``), so nothing compiles after the warm-up. The queue is bounded; a full
queue refuses new requests (``QueueFull``) rather than letting latency grow without bound.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time

import numpy as np

from rmjax.data import batching
from rmjax.data.batching import Encoded
from rmjax.data.records import Record
from rmjax.errors import DataError
from rmjax.heads.reward import pooled_response
from rmjax.scoring import bulk, compute


class QueueFull(Exception):
    """The engine's queue holds its maximum number of requests."""


@dataclasses.dataclass
class Job:
    """One request: every model's trees by key, and how its results map back."""

    encoded: dict[str, dict[int, Encoded]]  # role -> key -> tree
    members: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # texts: (key, response) per query
    records: list[Record] = dataclasses.field(default_factory=list)  # records: in request order, key = index
    truncated: set[int] = dataclasses.field(default_factory=set)
    tokens: int = 0  # tokens of its trees (the largest model's count)
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    enqueued: float = 0.0


class Engine:
    def __init__(self, scorer: bulk.Scorer, *, beta: float = 1.0, reduction: str = "sum", max_wait_s: float = 0.005,
                 max_queue: int = 256):
        s = scorer.s
        if s.pack_length <= 0 or not s.ladder:
            raise ValueError("the serving engine runs packed rows of fixed shapes: settings need pack_length and ladder")
        self.scorer, self.s = scorer, s
        self.beta, self.reduction = beta, reduction
        self.max_wait_s, self.max_queue = max_wait_s, max_queue
        self.row_limit = s.ladder[-1]
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.stats = {"batches": 0, "tokens": 0, "busy_seconds": 0.0}
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=4096)  # requests per batch
        self.window: collections.deque[tuple[float, int]] = collections.deque(maxlen=4096)  # (time, tokens)
        self._thread = threading.Thread(target=self._loop, name="rmjax-engine", daemon=True)

    # ------------------------------------------------------------------ life cycle
    def warm_up(self) -> int:
        return self.scorer.warm_up()

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued request, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ requests -> jobs
    @property
    def roles(self) -> list[str]:
        return [sl.role for sl in self.scorer.slots]

    def texts(self, queries: list[str], prompts: list[str] | None) -> Job:
        """OpenRLHF's /get_reward: full texts (the chat template already applied, special tokens
        included) and optionally each one's prompt text. Texts with the same prompt are one tree (the
        prompt's tokens run once); each text is tokenised whole and split where its tokens stop
        matching its prompt's, so every model sees exactly the tokenisation of the full text."""
        scorer = self.scorer
        if scorer.rm is None and scorer.policy is None:
            raise DataError("this server runs a judge, which compares two responses: POST /score with pair records "
                            "({\"prompt\", \"chosen\", \"rejected\"})")
        if prompts is None and scorer.rm is None:
            raise DataError("an implicit reward scores the response given its prompt: send 'prompts' (one per query) "
                            "so the response tokens are known")
        slots = [sl for sl in scorer.slots if sl.role != "judge"]
        # per model: each query's ids and where its response starts
        split: dict[str, list[tuple[list[int], int]]] = {}
        for sl in slots:
            tok, out = sl.tokenizer, []
            for i, q in enumerate(queries):
                ids = tok.encode(q, add_special_tokens=False)
                if prompts is None:
                    start = 1  # no prompt: the first token conditions the rest (a reward head reads the last)
                else:
                    if not q.startswith(prompts[i]):
                        raise DataError(f"query[{i}] does not begin with prompts[{i}]: a query is its prompt followed "
                                        "by the response")
                    p_ids = tok.encode(prompts[i], add_special_tokens=False)
                    start = next((j for j, (a, b) in enumerate(zip(ids, p_ids)) if a != b), min(len(ids), len(p_ids)))
                    if len(q) == len(prompts[i]) or start >= len(ids):
                        raise DataError(f"query[{i}] is its prompt alone: the response is empty")
                if len(ids) < 2:
                    raise DataError(f"query[{i}] is {len(ids)} token(s): a response needs a token before it")
                start = max(start, 1)
                out.append((ids, start))
            split[sl.role] = out
        # trees: queries grouped by prompt text, in order of first appearance; a group whose tree would
        # outgrow the longest row continues in another tree
        groups: dict[str, list[list[int]]] = {}
        for i in range(len(queries)):
            key = prompts[i] if prompts is not None else f"\0{i}"  # without prompts every query is its own tree
            trees = groups.setdefault(key, [[]])
            if trees[-1] and any(self._tree_tokens(split[r], trees[-1] + [i]) > self.row_limit for r in split):
                trees.append([])
            trees[-1].append(i)
        job = Job({sl.role: {} for sl in scorer.slots}, members=[(0, 0)] * len(queries))
        key = 0
        for trees in groups.values():
            for members in trees:
                for sl in slots:
                    job.encoded[sl.role][key] = self._text_tree(sl, split[sl.role], members)
                for j, i in enumerate(members):
                    job.members[i] = (key, j)
                key += 1
        job.tokens = max(sum(e.tree_length for e in enc.values()) for enc in job.encoded.values())
        return job

    @staticmethod
    def _tree_tokens(split: list[tuple[list[int], int]], members: list[int]) -> int:
        start = min(split[i][1] for i in members)
        return start + sum(len(split[i][0]) - start for i in members)

    def _text_tree(self, sl: bulk.ModelSlot, split: list[tuple[list[int], int]], members: list[int]) -> Encoded:
        start = min(split[i][1] for i in members)  # the tokens every member's text shares with its prompt
        prompt = split[members[0]][0][:start]
        responses = [split[i][0][start:] for i in members]
        kept = batching.truncate(prompt, responses, self.s.max_length, self.s.over_length)
        if isinstance(kept, str):
            raise DataError(f"query[{members[0]}]: {kept}")
        prompt, truncated = kept
        if len(prompt) + sum(map(len, responses)) > self.row_limit:
            raise DataError(f"query[{members[0]}]: {len(prompt) + sum(map(len, responses))} tokens do not fit the "
                            f"longest row ({self.row_limit} tokens; --row-length)")
        gate = 0
        if sl.role == "rm":
            pad = sl.loaded.config.pad_token_id
            responses = [pooled_response(r, pad) for r in responses]
            if sl.reward.spec.gated:  # the gating token: the last end-of-turn token of the prompt
                ends = set(sl.tokenizer.end_of_turn_ids)
                at = [j for j, t in enumerate(prompt) if t in ends]
                gate = len(prompt) - 1 - at[-1] if at else 0
        return Encoded(np.asarray(prompt, np.int32), tuple(np.asarray(r, np.int32) for r in responses), truncated,
                       gate)

    def records(self, records: list[Record]) -> Job:
        """Structured records (prompt messages + responses), rendered by each model as ``rmjax score``
        renders them; a record any model cannot score fails the request, naming the record and why."""
        encoded, dropped, truncated = self.scorer.encode_records(records)
        if dropped:
            raise DataError("; ".join(why if why.startswith(f"records[{i}]") else f"records[{i}]: {why}"
                                      for i, why in sorted(dropped.items())))
        for role, enc in encoded.items():
            for i, e in enc.items():
                if e.tree_length > self.row_limit:
                    raise DataError(f"records[{i}]: its prompt and responses are {e.tree_length} tokens for the "
                                    f"{role}, more than the longest row ({self.row_limit} tokens; --row-length)")
        job = Job(encoded, records=list(records), truncated=truncated)
        job.tokens = max(sum(e.tree_length for e in enc.values()) for enc in encoded.values())
        return job

    # ------------------------------------------------------------------ results
    def text_rewards(self, job: Job, results: dict) -> tuple[list[float], dict[str, list[float]]]:
        """Per query: the reward (the RM's, else the implicit reward) and the other per-query values
        (each objective of a multi-objective RM, the implicit reward beside an RM)."""
        per: dict[str, list[float]] = collections.defaultdict(list)
        for key, j in job.members:
            res = results[key]
            if "rm" in res:
                per["rm"].append(float(res["rm"]["rm"][j]))
                if "rm_objectives" in res["rm"]:
                    for k, objective in enumerate(self.scorer.rm.reward.spec.objectives):
                        per[f"rm[{objective}]"].append(float(res["rm"]["rm_objectives"][j][k]))
            if "policy" in res:
                rewards = compute.implicit_rewards(res["policy"], res.get("reference"), self.beta, self.reduction)
                per["implicit"].append(float(rewards[j]))
        main = "rm" if "rm" in per else "implicit"
        return per.pop(main), dict(per)

    def record_rows(self, job: Job, results: dict) -> list[dict]:
        """``rmjax score``'s row for each record (the same columns and values)."""
        return [self.scorer.row(rec, results[rec.index], rec.index in job.truncated) for rec in job.records]

    # ------------------------------------------------------------------ the queue
    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue a job; its future gets ``{key: {role: stats}}``. QueueFull when the queue is full."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are queued (the limit, --max-queue)")
            job.enqueued = time.perf_counter()
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest job, and others while they fit ``batch_tokens`` and the oldest
        has waited less than ``max_wait_s``; None when stopped with nothing left."""
        budget = self.s.batch_tokens
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = self._queue[0].enqueued + self.max_wait_s
            while not self._stopping and sum(j.tokens for j in self._queue) < budget:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, tokens = [self._queue.popleft()], 0
            tokens = batch[0].tokens
            while self._queue and tokens + self._queue[0].tokens <= budget:
                tokens += self._queue[0].tokens
                batch.append(self._queue.popleft())
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            t0 = time.perf_counter()
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 (a failed batch fails its callers, never the worker)
                if len(batch) == 1:
                    batch[0].future.set_exception(e)
                else:  # one request's fault must not fail the others: each alone
                    for job in batch:
                        try:
                            self._run([job])
                        except Exception as e1:  # noqa: BLE001
                            job.future.set_exception(e1)
            done = time.perf_counter()
            tokens = sum(j.tokens for j in batch)
            self.stats["batches"] += 1
            self.stats["tokens"] += tokens
            self.stats["busy_seconds"] += done - t0
            self.batch_sizes.append(len(batch))
            self.window.append((done, tokens))

    def _run(self, batch: list[Job]) -> None:
        """Every job's trees under keys of their own, scored together; each job's results by its keys."""
        merged: dict[str, dict[int, Encoded]] = {role: {} for role in self.roles}
        owners: list[tuple[Job, dict[int, int]]] = []
        offset = 0
        for job in batch:
            keys = sorted({k for enc in job.encoded.values() for k in enc})
            local = {k: offset + n for n, k in enumerate(keys)}
            for role, enc in job.encoded.items():
                merged[role].update({local[k]: e for k, e in enc.items()})
            owners.append((job, local))
            offset += len(keys)
        results = self.scorer.run_encoded(merged)
        for job, local in owners:
            if not job.future.done():
                job.future.set_result({k: results[g] for k, g in local.items()})

    def tokens_per_second(self, seconds: float = 60.0) -> float:
        """Tokens scored per second over the last ``seconds``."""
        now = time.perf_counter()
        recent = [n for t, n in list(self.window) if now - t <= seconds]
        return sum(recent) / seconds if recent else 0.0
