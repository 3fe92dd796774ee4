"""OpenAI-compatible serving: `picochat serve` (cli/serve.py) runs `create_app(load_backend(...))` on uvicorn.

batcher.py  one worker thread owns the decode engine (generate.Engine) and runs concurrent requests as one
            batch, streaming tokens back every chunk
schemas.py  request models, validation, OpenAI's error shape
app.py      FastAPI routes, stop strings, server-sent events
"""

from picochat_jax.serve.app import Backend, create_app, load_backend
from picochat_jax.serve.batcher import Batcher, BatcherStats

__all__ = ["Backend", "Batcher", "BatcherStats", "create_app", "load_backend"]
