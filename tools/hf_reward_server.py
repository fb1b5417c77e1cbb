"""The server a user would otherwise run: a transformers sequence classifier behind FastAPI, as
OpenRLHF's ``serve_rm`` is (the benchmark's baseline for ``rmjax serve``; ``tools/bench_serve.py``).

    python tools/hf_reward_server.py DIR --port 5001 [--max-length 2048]

POST /get_reward {"query": [texts], "prompts": [...]} -> {"rewards", "scores", "extra_logs"}: the texts of
one request tokenised together (left padding, no special tokens added, truncated to --max-length) and
run through the model in one batch; requests are served one after another (the model call holds the
event loop, as serve_rm's does). GET /health answers once the model is loaded.
"""
from __future__ import annotations

import argparse

import torch
import uvicorn
from fastapi import FastAPI, Request
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--max-length", type=int, default=2048)
    args = p.parse_args()
    model = AutoModelForSequenceClassification.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    app = FastAPI()

    @app.post("/get_reward")
    async def get_reward(request: Request):
        queries = (await request.json())["query"]
        batch = tok(queries, return_tensors="pt", add_special_tokens=False, max_length=args.max_length, padding=True,
                    truncation=True)
        with torch.inference_mode():
            rewards = model(**batch).logits[:, 0].tolist()
        return {"rewards": rewards, "scores": rewards, "extra_logs": {}}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
