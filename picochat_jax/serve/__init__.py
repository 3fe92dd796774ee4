"""OpenAI-compatible serving: `picochat serve` (cli/serve.py) runs `create_app(load_backend(...))` on uvicorn.

engine.py   chunked, per-row-sampled KV-cache decoding (tokens come back every few steps, for streams)
batcher.py  one worker thread owns the engine and runs concurrent requests as one batch
schemas.py  request models, validation, OpenAI's error shape
app.py      FastAPI routes, stop strings, server-sent events
"""

from picochat_jax.serve.app import Backend, create_app, load_backend
from picochat_jax.serve.batcher import Batcher, BatcherStats
from picochat_jax.serve.engine import ChunkedEngine, RowSampling

__all__ = ["Backend", "Batcher", "BatcherStats", "ChunkedEngine", "RowSampling", "create_app", "load_backend"]
