"""`picochat web`: the workbench's ASGI app (FastAPI, as `serve`) over a runs root and a packs root.

    app = create_web_app(WebSettings(runs_root=Path("runs"), packs_root=Path("examples")))
    uvicorn.run(app, host="127.0.0.1", port=8080)

Pages: runs (sortable), a run (timeline, live curves, preflight, SFT fit, eval scoreboard, honesty, gate, evidence
files), compare, data (packs), chat, jobs. JSON under /api; live metrics as server-sent events at
/api/runs/NAME/events. Chat goes through the serve stack itself: /llm/MODEL/v1/chat/completions is `serve`'s
OpenAI app for that model (the one decode engine), loaded on first use. With an auth token every route
checks it (bearer header, or the cookie /login sets), static files and event streams included.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)

from picochat_jax.web import pages, store
from picochat_jax.web.jobs import JobError, JobManager

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "picochat_web_token"
OPEN_PATHS = ("/login",)


@dataclass(frozen=True)
class WebSettings:
    runs_root: Path
    packs_root: Path
    auth_token: str | None = None
    precision: str = "fp32"  # chat models
    poll_sec: float = 1.0  # event streams: how often a running run's metrics are re-read


def known_scales() -> tuple[str, ...]:
    from picochat_jax.config import CONFIG_DIR

    return tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "base"))


class ModelApps:
    """serve's OpenAI app per chat model, created (and its batcher started) on first use."""

    def __init__(self, settings: WebSettings):
        self.settings = settings
        self.apps: dict[str, Any] = {}
        self.backends: list[Any] = []
        self.lock = asyncio.Lock()

    async def get(self, model_id: str) -> Any:
        async with self.lock:
            if model_id not in self.apps:
                from picochat_jax.serve.app import create_app
                from picochat_jax.serve.backend import load_backend

                source = store.model_source(self.settings.runs_root, model_id)
                backend = await asyncio.to_thread(load_backend, **source, model_name=model_id,
                                                  precision=self.settings.precision, warmup=False)
                backend.batcher.start()
                self.backends.append(backend)
                self.apps[model_id] = create_app(backend)
            return self.apps[model_id]

    def close(self) -> None:
        for backend in self.backends:
            backend.batcher.close()


def _authorized(scope: dict[str, Any], token: str) -> bool:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    given = headers.get("authorization", "")
    if given.startswith("Bearer ") and secrets.compare_digest(given[7:].encode(), token.encode()):
        return True
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and secrets.compare_digest(value.encode(), token.encode()):
            return True
    return False


class Workbench:
    """The outer ASGI app: the token check for every route, then /llm/... to the model apps, else the pages."""

    def __init__(self, web: FastAPI, models: ModelApps, jobs: JobManager, token: str | None):
        self.web, self.models, self.jobs, self.token = web, models, jobs, token

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            path = scope.get("path", "")
            if self.token and path not in OPEN_PATHS and not _authorized(scope, self.token):
                wants_html = any(k == b"accept" and b"text/html" in v for k, v in scope.get("headers", []))
                if wants_html and scope["type"] == "http" and not path.startswith(("/api/", "/llm/")):
                    response: Any = RedirectResponse("/login", status_code=303)
                else:
                    response = JSONResponse({"error": {"message": "missing or wrong token", "type": "auth"}},
                                            status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
            if path.startswith("/llm/") and scope["type"] == "http":
                model_id, sep, rest = path[len("/llm/"):].partition("/v1/")
                if not sep:
                    await JSONResponse({"error": {"message": "use /llm/MODEL/v1/..."}}, 404)(scope, receive, send)
                    return
                try:
                    app = await self.models.get(model_id)
                except store.NotFound:
                    await JSONResponse({"error": {"message": f"unknown model {model_id}"}}, 404)(scope, receive,
                                                                                                  send)
                    return
                await app({**scope, "path": "/v1/" + rest, "raw_path": ("/v1/" + rest).encode(), "root_path": ""},
                          receive, send)
                return
        await self.web(scope, receive, send)


def create_web_app(settings: WebSettings) -> Workbench:
    runs_root, packs_root = settings.runs_root, settings.packs_root
    scales = known_scales()
    jobs = JobManager(runs_root, packs_root, scales)
    models = ModelApps(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.to_thread(jobs.close)
            await asyncio.to_thread(models.close)

    app = FastAPI(title="picochat workbench", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(store.NotFound)
    async def not_found(request: Request, exc: store.NotFound) -> Any:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": {"message": f"not found: {exc}"}}, 404)
        return HTMLResponse(pages.layout("Not found", f"<p>Nothing here: {pages.e(exc)}</p>"), 404)

    @app.exception_handler(JobError)
    async def job_error(request: Request, exc: JobError) -> JSONResponse:
        return JSONResponse({"error": {"message": str(exc)}}, 400)

    # ------------------------------------------------------------------ sign-in (the one route open without a token)
    @app.get("/login", response_class=HTMLResponse)
    async def login_form() -> str:
        return pages.login_page()

    @app.post("/login")
    async def login(request: Request) -> Any:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        given = (form.get("token") or [""])[0]
        if not settings.auth_token or not secrets.compare_digest(given.encode(), settings.auth_token.encode()):
            return HTMLResponse(pages.login_page("That token is not right."), 401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, given, httponly=True, samesite="strict")
        return response

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(status_code=204)  # no icon: an empty answer keeps browser consoles free of 404s

    @app.get("/static/{name}")
    async def static(name: str) -> FileResponse:
        path = store.inside(STATIC, name)
        if not path.is_file():
            raise store.NotFound(name)
        return FileResponse(path)

    # ------------------------------------------------------------------ pages
    @app.get("/", response_class=HTMLResponse)
    async def runs_page() -> str:
        return pages.runs_page(await asyncio.to_thread(store.list_runs, runs_root))

    @app.get("/runs/{name:path}", response_class=HTMLResponse)
    async def run_page(name: str) -> str:
        return pages.run_page(await asyncio.to_thread(store.run_detail, runs_root, name))

    @app.get("/compare", response_class=HTMLResponse)
    async def compare_page(request: Request) -> str:
        names = request.query_params.getlist("run")
        rows = await asyncio.to_thread(store.list_runs, runs_root)
        by_name = {r["name"]: r for r in rows}
        chosen = [by_name[n] for n in names if n in by_name]
        curves = {}
        for r in chosen:
            run_dir = store.resolve_run(runs_root, r["name"])
            curves[r["name"]] = {s: store.read_metrics(p)[0] for s, p in store.metric_files(run_dir).items()}
        return pages.compare_page(rows, chosen, curves)

    @app.get("/data", response_class=HTMLResponse)
    async def packs_page() -> str:
        return pages.packs_page(await asyncio.to_thread(store.list_packs, packs_root))

    @app.get("/data/{rel:path}", response_class=HTMLResponse)
    async def pack_page(rel: str, scale: str = "pico") -> str:
        if scale not in scales:
            raise store.NotFound(scale)
        return pages.pack_page(await asyncio.to_thread(store.pack_detail, packs_root, rel, scale))

    @app.get("/chat", response_class=HTMLResponse)
    async def chat_page() -> str:
        return pages.chat_page(await asyncio.to_thread(store.list_models, runs_root))

    @app.get("/jobs", response_class=HTMLResponse)
    async def jobs_page() -> str:
        packs = await asyncio.to_thread(store.list_packs, packs_root)
        return pages.jobs_page([j.as_dict() for j in jobs.jobs.values()], packs, scales)

    @app.get("/files/{name:path}")
    async def evidence(name: str) -> FileResponse:
        run_rel, _, rel = name.partition("/")
        run_dir = store.resolve_run(runs_root, run_rel)
        path = store.inside(run_dir, rel)
        allowed = {f["path"] for f in store.evidence_files(run_dir)}
        if path.relative_to(run_dir.resolve()).as_posix() not in allowed:
            raise store.NotFound(name)
        media = "text/plain; charset=utf-8" if path.suffix in (".md", ".jsonl", ".txt", ".log") else None
        return FileResponse(path, media_type=media)

    # ------------------------------------------------------------------ JSON API
    @app.get("/api/runs")
    async def api_runs() -> list[dict[str, Any]]:
        return await asyncio.to_thread(store.list_runs, runs_root)

    @app.get("/api/runs/{name:path}/metrics")
    async def api_metrics(name: str) -> dict[str, Any]:
        run_dir = store.resolve_run(runs_root, name)
        return {"status": store.run_status(run_dir),
                "curves": {s: store.read_metrics(p)[0] for s, p in store.metric_files(run_dir).items()}}

    @app.get("/api/runs/{name:path}/events")
    async def api_events(name: str) -> StreamingResponse:
        run_dir = store.resolve_run(runs_root, name)

        async def events() -> AsyncIterator[bytes]:
            offsets: dict[str, int] = {}
            while True:
                fresh = {}
                for stage, path in store.metric_files(run_dir).items():
                    rows, offsets[stage] = store.read_metrics(path, offsets.get(stage, 0))
                    if rows:
                        fresh[stage] = rows
                status = store.run_status(run_dir)
                yield f"data: {json.dumps({'status': status, 'rows': fresh})}\n\n".encode()
                if status != "running":
                    return
                await asyncio.sleep(settings.poll_sec)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/runs/{name:path}")
    async def api_run(name: str) -> dict[str, Any]:
        return await asyncio.to_thread(store.run_detail, runs_root, name)

    @app.get("/api/packs")
    async def api_packs() -> list[dict[str, Any]]:
        return await asyncio.to_thread(store.list_packs, packs_root)

    @app.get("/api/packs/{rel:path}")
    async def api_pack(rel: str) -> dict[str, Any]:
        return await asyncio.to_thread(store.pack_detail, packs_root, rel)

    @app.get("/api/models")
    async def api_models() -> list[dict[str, str]]:
        return await asyncio.to_thread(store.list_models, runs_root)

    @app.get("/api/jobs")
    async def api_jobs() -> list[dict[str, Any]]:
        return [j.as_dict() for j in jobs.jobs.values()]

    @app.post("/api/jobs")
    async def api_start_job(request: Request) -> JSONResponse:
        try:
            form = await request.json()
        except ValueError as exc:
            raise JobError("send the job as a JSON object") from exc
        if not isinstance(form, dict):
            raise JobError("send the job as a JSON object")
        job = jobs.start({k: v for k, v in form.items() if v not in (None, "")})
        return JSONResponse(job.as_dict(), 201)

    @app.get("/api/jobs/{job_id}")
    async def api_job(job_id: str) -> dict[str, Any]:
        return jobs.get(job_id).as_dict()

    @app.post("/api/jobs/{job_id}/cancel")
    async def api_cancel(job_id: str) -> dict[str, Any]:
        return jobs.cancel(job_id).as_dict()

    return Workbench(app, models, jobs, settings.auth_token)
