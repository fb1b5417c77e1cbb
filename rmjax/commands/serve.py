"""`rmjax serve`: flags mapped onto ``rmjax.jobs.serve.ServeConfig``."""
from __future__ import annotations

import argparse

from rmjax.commands.options import NUMERICS_FLAGS, Flag, add_config_arguments, config_from_args
from rmjax.jobs import serve
from rmjax.jobs.serve import ServeConfig

SERVE_FLAGS = {
    "--policy": "model.policy", "--reference": "model.reference", "--rm": "model.rm", "--judge": "model.judge",
    "--judge-labels": Flag("model.judge_labels", nargs=2, metavar=("FIRST", "SECOND")),
    "--judge-template": "model.judge_template", "--beta": "beta", "--reduction": "reduction",
    "--template": "data.template", "--reference-template": "reference_template",
    "--max-length": "data.max_length", "--over-length": "data.over_length",
    "--row-length": "batch.row_length", "--batch-tokens": "batch.batch_tokens", "--max-wait-ms": "batch.max_wait_ms",
    "--max-queue": "batch.max_queue", "--strategy": "mesh.strategy", "--host": "host", "--port": "port",
    "--max-body-mb": "max_body_mb", "--max-texts": "max_texts",
    **NUMERICS_FLAGS,
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a reward model over HTTP (OpenRLHF's /get_reward, /score, /health, "
                                     "/metrics) with dynamic batching",
                       description="A reward model behind HTTP for RL trainers (rmjax.jobs.serve): POST /get_reward "
                                   "as OpenRLHF's remote reward model (--remote_rm_url http://HOST:PORT/get_reward), "
                                   "POST /score with records as rmjax score reads them, GET /health, GET /metrics "
                                   "(Prometheus). Concurrent requests share packed batches of a few fixed shapes, "
                                   "all compiled before the server listens. Binds 127.0.0.1 unless --host says "
                                   f"otherwise; set {serve.TOKEN_ENV} to require a bearer token. Default: the "
                                   "implicit RM rmjax ships, as rmjax score's.")
    add_config_arguments(p, ServeConfig, SERVE_FLAGS)
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    serve.run(config_from_args(ServeConfig, args))
    return 0
