"""OpenAI-compatible serving: `picochat serve` (cli/serve.py) runs `create_app(load_backend(...))` on uvicorn.

backend.py  the served model: name, chat format, batcher, request limits (`load_backend`)
batcher.py  one worker thread owns the decode engine (generate.Engine) and runs concurrent requests as one
            batch, streaming tokens back every chunk
schemas.py  request models, strict validation, OpenAI's error shape
text.py     token chunks -> text pieces: detokenizing off the event loop, stop strings, stream hold-back
app.py      FastAPI routes, error handlers, the body-size limit, server-sent events
"""

from picochat_jax.serve.app import create_app
from picochat_jax.serve.backend import Backend, load_backend
from picochat_jax.serve.batcher import Batcher, BatcherStats

__all__ = ["Backend", "Batcher", "BatcherStats", "create_app", "load_backend"]
