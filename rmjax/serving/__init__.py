"""Serving a reward model over HTTP: ``engine`` (dynamic batching onto the scoring engine's packed rows of
fixed shapes) and ``app`` (the FastAPI routes); ``rmjax.jobs.serve`` starts them."""
