"""`picochat web` over HTTP (httpx against the ASGI app): what each page and API shows from a run's own files,
live metrics as server-sent events, chat through serve's OpenAI API, jobs, the token on every route, and
paths that try to leave the roots."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from picochat_jax.cli import main
from picochat_jax.outdir import MARKER
from picochat_jax.web import store
from picochat_jax.web.app import WebSettings, create_web_app
from picochat_jax.web.jobs import JobError, build_command

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def client(web_roots):
    runs, packs = web_roots
    with TestClient(create_web_app(WebSettings(runs_root=runs, packs_root=packs, poll_sec=0.05))) as c:
        yield c


def test_runs_list_reads_each_runs_own_files(client, web_roots):
    rows = {r["name"]: r for r in client.get("/api/runs").json()}
    assert set(rows) == {"alpha", "beta"}
    alpha = rows["alpha"]
    assert alpha["kind"] == "run" and alpha["scale"] == "smoke" and alpha["status"] == "finished"
    gate = json.loads((web_roots[0] / "alpha" / "release" / "gate.json").read_text())
    assert alpha["verdict"] == gate["decision"] and alpha["tokens"] > 0
    assert rows["beta"]["base_loss"] == pytest.approx(alpha["base_loss"] + 0.25)
    html = client.get("/").text
    assert '<a href="/runs/alpha">alpha</a>' in html and 'class="sort"' in html and gate["decision"] in html


def test_run_page_shows_the_evidence(client, web_roots):
    html = client.get("/runs/alpha").text
    for heading in ("Stage timeline", "Curves", "Preflight", "SFT fit", "Eval scoreboard", "Honesty", "Release gate",
                    "Evidence files"):
        assert f"<h2>{heading}" in html, heading
    rows = [json.loads(x) for x in (web_roots[0] / "alpha" / "eval" / "eval_results.jsonl").read_text().splitlines()]
    assert html.count('data-result="') == len(rows)
    assert f'data-category="{rows[0]["category"]}"' in html
    assert '<a href="/files/alpha/release/release_card.md">' in html
    card = client.get("/files/alpha/release/release_card.md")
    assert card.status_code == 200 and card.text == (web_roots[0] / "alpha" / "release" / "release_card.md").read_text()
    curves = client.get("/api/runs/alpha/metrics").json()
    assert curves["status"] == "finished" and {"base", "sft"} <= set(curves["curves"])
    assert curves["curves"]["base"][0]["step"] == 1 and "loss" in curves["curves"]["base"][0]


def test_values_from_files_are_escaped(tmp_path, web_roots):
    runs = tmp_path / "runs"
    run = runs / "evil"
    (run / "eval").mkdir(parents=True)
    (run / MARKER).write_text(json.dumps({"kind": "run"}))
    row = {"line": 1, "category": "x", "prompt": "<script>alert(1)</script>", "reply": "</script><b>", "pass": False}
    (run / "eval" / "eval_results.jsonl").write_text(json.dumps(row) + "\n")
    with TestClient(create_web_app(WebSettings(runs_root=runs, packs_root=tmp_path))) as c:
        html = c.get("/runs/evil").text
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_status_comes_from_the_run_status_file(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / MARKER).write_text(json.dumps({"kind": "run"}))
    status = {"status": "running", "pid": os.getpid(), "host": socket.gethostname()}
    (run / "run_status.json").write_text(json.dumps(status))
    assert store.run_status(run) == "running"
    dead = 2**22 + 12345  # beyond the default pid range: no such process
    (run / "run_status.json").write_text(json.dumps({**status, "pid": dead}))
    assert store.run_status(run) == "failed"
    (run / "run_status.json").write_text(json.dumps({**status, "status": "failed", "error": "boom"}))
    assert store.run_status(run) == "failed"
    (run / "summary.json").write_text(json.dumps({"status": "completed"}))
    assert store.run_status(run) == "finished"


def test_run_tiny_writes_its_status_file(web_roots):
    status = json.loads((web_roots[0] / "alpha" / "run_status.json").read_text())
    assert status["status"] == "completed" and status["pid"] > 0 and "base" in status["stages_done"]


def test_live_metrics_arrive_as_server_sent_events(tmp_path):
    runs = tmp_path / "runs"
    run = runs / "live"
    (run / "base").mkdir(parents=True)
    (run / MARKER).write_text(json.dumps({"kind": "run"}))
    (run / "run_status.json").write_text(json.dumps({"status": "running", "pid": os.getpid(),
                                                     "host": socket.gethostname()}))
    metrics = run / "base" / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n" + '{"step": 2, "lo')  # a line being written
    app = create_web_app(WebSettings(runs_root=runs, packs_root=tmp_path, poll_sec=0.05))
    with TestClient(app) as c, c.stream("GET", "/api/runs/live/events") as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = resp.iter_lines()
        first = json.loads(next(e for e in events if e.startswith("data: "))[6:])
        assert first == {"status": "running", "rows": {"base": [{"step": 1, "loss": 5.0}]}}
        with open(metrics, "a") as fh:
            fh.write('ss": 4.5}\n')
        later = json.loads(next(e for e in events if e.startswith("data: ") and "4.5" in e)[6:])
        assert later["rows"]["base"] == [{"step": 2, "loss": 4.5}]
        (run / "summary.json").write_text(json.dumps({"status": "completed"}))
        last = [json.loads(e[6:]) for e in events if e.startswith("data: ")][-1]
        assert last["status"] == "finished"  # the stream ends when the run does


def test_compare_overlays_runs_with_differences(client):
    html = client.get("/compare?run=alpha&run=beta").text
    assert 'id="compare"' in html and "(+0.2500)" in html and 'id="compare-curves"' in html
    assert "Pick two or more runs" in client.get("/compare?run=alpha").text


def test_data_pages_show_files_figures_and_row_errors(client, web_roots, tmp_path):
    _, packs = web_roots
    assert "greetings/tiny_dataset_pack.json" in client.get("/data").text
    html = client.get("/data/greetings/tiny_dataset_pack.json").text
    assert "every file reads cleanly" in html and "Readiness for pico" in html and "Preview: chat" in html
    bad = packs / "broken"
    bad.mkdir()
    for name in ("corpus.txt",):
        (bad / name).write_text("some text " * 50)
    (bad / "chat.jsonl").write_text(json.dumps({"user": "hi", "assistant": "hello"}) + "\n" + '{"user": "no reply"}\n')
    (bad / "dataset_pack.json").write_text(json.dumps({"name": "broken", "corpus": "corpus.txt", "chat": "chat.jsonl"}))
    html = client.get("/data/broken/dataset_pack.json").text
    assert "1 problem(s)" in html and "chat.jsonl:2: field &#x27;assistant&#x27; is missing" in html


def test_chat_streams_through_serves_openai_api(client):
    models = client.get("/api/models").json()
    ids = [m["id"] for m in models]
    assert "alpha/sft" in ids and "chat" in client.get("/chat").text
    body = {"model": "alpha/sft", "messages": [{"role": "user", "content": "hello"}], "stream": True,
            "max_tokens": 8, "temperature": 0}
    with client.stream("POST", "/llm/alpha/sft/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert chunks and chunks[0]["object"] == "chat.completion.chunk"
    whole = client.post("/llm/alpha/sft/v1/chat/completions", json={**body, "stream": False}).json()
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == whole["choices"][0]["message"]["content"]  # greedy: the same reply either way
    assert client.post("/llm/nope/v1/chat/completions", json=body).status_code == 404


def test_paths_never_leave_the_roots(client, web_roots, tmp_path_factory):
    runs, _ = web_roots
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_text("secret")
    (runs / "alpha" / "eval" / "leak.txt").symlink_to(outside / "secret.txt")
    (runs / "link").symlink_to(outside, target_is_directory=True)
    try:
        for url in ("/files/alpha/../../secret.txt", "/files/alpha/%2e%2e/%2e%2e/secret.txt",
                    "/files/alpha/eval/leak.txt", "/files/link/secret.txt", "/runs/..%2F..%2Fetc",
                    "/api/runs/../alpha", "/data/..%2F..%2Fetc%2Fpasswd", "/static/..%2Fapp.py",
                    "/files/alpha/base/checkpoint/model_config.json"):
            resp = client.get(url)
            assert resp.status_code == 404, url
            assert resp.text != "secret"
        with pytest.raises(store.NotFound):
            store.inside(runs, "../outside")
        with pytest.raises(store.NotFound):
            store.inside(runs, "link/secret.txt")
    finally:
        (runs / "alpha" / "eval" / "leak.txt").unlink()
        (runs / "link").unlink()


def test_token_is_checked_on_every_route(web_roots):
    runs, packs = web_roots
    app = create_web_app(WebSettings(runs_root=runs, packs_root=packs, auth_token=TOKEN, poll_sec=0.05))
    with TestClient(app) as c:
        for url in ("/api/runs", "/api/runs/alpha/events", "/api/jobs", "/static/app.js", "/files/alpha/summary.json",
                    "/api/models"):
            assert c.get(url).status_code == 401, url
        assert c.post("/llm/alpha/sft/v1/chat/completions", json={}).status_code == 401
        assert c.post("/api/jobs", json={"command": "run-tiny"}).status_code == 401
        assert c.get("/", headers={"Accept": "text/html"}, follow_redirects=False).headers["location"] == "/login"
        assert c.get("/login").status_code == 200
        assert c.post("/login", data={"token": "wrong"}).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert c.get("/api/runs", headers=auth).status_code == 200
        assert c.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        resp = c.post("/login", data={"token": TOKEN}, follow_redirects=False)
        assert resp.status_code == 303 and "httponly" in resp.headers["set-cookie"].lower()
        with c.stream("GET", "/api/runs/alpha/events") as events:  # the cookie now signs the event stream in
            assert events.status_code == 200


def test_web_refuses_a_public_host_without_a_token(tmp_path):
    result = CliRunner().invoke(main, ["web", "--host", "0.0.0.0", "--runs-root", str(tmp_path)])
    assert result.exit_code != 0 and "--auth-token" in result.output


PACK = "greetings/tiny_dataset_pack.json"


def test_job_launcher_accepts_only_known_commands_and_options(web_roots):
    runs, packs = web_roots
    scales = ("pico", "smoke")
    argv, out = build_command({"command": "run-tiny", "name": "new-run", "dataset_pack": PACK,
                               "scale": "smoke", "base_steps": "3"}, runs, packs, scales)
    assert argv[:2] == ["run", "tiny"] and out == runs.resolve() / "new-run" and "--base-steps" in argv
    bad = [({"command": "rm", "name": "x"}, "command"),
           ({"command": "run-tiny", "name": "x", "dataset_pack": PACK, "extra": "1"},
            "unknown option"),
           ({"command": "run-tiny", "name": "../x", "dataset_pack": PACK}, "name"),
           ({"command": "run-tiny", "name": "alpha", "dataset_pack": PACK}, "already exists"),
           ({"command": "run-tiny", "name": "x", "dataset_pack": "../../etc/passwd"}, "dataset_pack"),
           ({"command": "run-tiny", "name": "x", "dataset_pack": PACK, "scale": "huge"},
            "scale"),
           ({"command": "run-tiny", "name": "x", "dataset_pack": PACK,
             "base_steps": "1; rm -rf /"}, "integer"),
           ({"command": "hf-sft", "name": "x", "model": "alpha", "input": "greetings/chat.jsonl"}, "config.json")]
    for form, message in bad:
        with pytest.raises(JobError, match=message):
            build_command(form, runs, packs, scales)


@pytest.mark.slow
def test_a_job_runs_the_cli_and_a_cancel_sends_sigterm(tmp_path, web_roots):
    _, packs = web_roots
    runs = tmp_path / "runs"
    app = create_web_app(WebSettings(runs_root=runs, packs_root=packs))
    with TestClient(app) as c:
        started = c.post("/api/jobs", json={"command": "run-tiny", "name": "from-web", "scale": "smoke",
                                            "dataset_pack": "greetings/tiny_dataset_pack.json", "base_steps": 4,
                                            "sft_steps": 4})
        assert started.status_code == 201, started.text
        job = started.json()
        assert job["command"].startswith("picochat run tiny --dataset-pack")
        deadline = time.monotonic() + 240
        while c.get(f"/api/jobs/{job['id']}").json()["status"] == "running" and time.monotonic() < deadline:
            time.sleep(0.5)
        done = c.get(f"/api/jobs/{job['id']}").json()
        assert done["status"] == "finished", done["log_tail"]
        assert "[gate]" in done["log_tail"]
        assert {r["name"]: r for r in c.get("/api/runs").json()}["from-web"]["status"] == "finished"
        long = c.post("/api/jobs", json={"command": "run-tiny", "name": "cancelled", "scale": "smoke",
                                         "dataset_pack": "greetings/tiny_dataset_pack.json", "base_steps": 100000})
        job_id = long.json()["id"]
        time.sleep(1.0)
        assert c.post(f"/api/jobs/{job_id}/cancel").json()["status"] in ("running", "cancelled")
        deadline = time.monotonic() + 120
        while c.get(f"/api/jobs/{job_id}").json()["status"] == "running" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert c.get(f"/api/jobs/{job_id}").json()["status"] == "cancelled"
    assert Path(runs / ".picochat-web" / "jobs").is_dir()
