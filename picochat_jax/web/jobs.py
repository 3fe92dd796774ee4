"""Background jobs the workbench starts: the CLI's own process (`picochat run tiny`, `picochat train hf-sft`),
built from a whitelist of commands and options, never from a string a request supplies.

A job's out-dir is a new folder directly under the runs root; its log goes to
`RUNS_ROOT/.picochat-web/jobs/<id>.log` (a folder the workbench makes). Cancelling sends SIGTERM, on which
the trainers save a resume checkpoint and exit 3.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from picochat_jax.web.store import NotFound, inside, is_pack_file

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEVICES = ("cpu", "cuda", "tpu")
PRECISIONS = ("fp32", "bf16")


class JobError(ValueError):
    """A job request the launcher refuses (unknown command or option, bad value, out-dir taken)."""


def _int(form: dict[str, Any], key: str, low: int, high: int, default: int | None = None) -> int | None:
    raw = form.get(key)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except (TypeError, ValueError) as exc:
        raise JobError(f"{key} must be an integer") from exc
    if not low <= value <= high:
        raise JobError(f"{key} must be between {low} and {high}")
    return value


def _choice(form: dict[str, Any], key: str, choices: tuple[str, ...], default: str | None = None) -> str | None:
    value = form.get(key) or default
    if value is not None and value not in choices:
        raise JobError(f"{key} must be one of {', '.join(choices)}")
    return value


def build_command(form: dict[str, Any], runs_root: Path, packs_root: Path,
                  scales: tuple[str, ...]) -> tuple[list[str], Path]:
    """The argv (after `picochat`) and out-dir of a job request. Only known commands and options pass."""
    allowed = {"command", "name", "dataset_pack", "scale", "device", "precision", "base_steps", "sft_steps", "model",
               "input", "max_steps", "max_length", "peft", "quantize"}
    unknown = sorted(set(form) - allowed)
    if unknown:
        raise JobError(f"unknown option(s): {', '.join(unknown)}")
    name = str(form.get("name") or "")
    if not RUN_NAME.match(name):
        raise JobError("name: letters, digits, '.', '_' and '-' only (a new folder under the runs root)")
    out_dir = runs_root.resolve() / name
    if out_dir.exists():
        raise JobError(f"{name} already exists under the runs root; choose a new name")
    command = form.get("command")
    if command == "run-tiny":
        try:
            pack = inside(packs_root, str(form.get("dataset_pack") or ""))
        except NotFound as exc:
            raise JobError("dataset_pack: a dataset_pack.json under the packs root") from exc
        if not is_pack_file(pack):
            raise JobError("dataset_pack: a dataset_pack.json under the packs root")
        argv = ["run", "tiny", "--dataset-pack", str(pack), "--out-dir", str(out_dir),
                "--scale", _choice(form, "scale", scales, "pico")]
        for key in ("base_steps", "sft_steps"):
            value = _int(form, key, 1, 1_000_000)
            if value is not None:
                argv += [f"--{key.replace('_', '-')}", str(value)]
    elif command == "hf-sft":
        try:
            model = inside(runs_root, str(form.get("model") or ""))
        except NotFound:
            try:
                model = inside(packs_root, str(form.get("model") or ""))
            except NotFound as exc:
                raise JobError("model: an HF model folder under the runs or packs root") from exc
        if not (model / "config.json").is_file():
            raise JobError("model: an HF model folder (with config.json) under the runs or packs root")
        try:
            chat = inside(packs_root, str(form.get("input") or ""))
        except NotFound as exc:
            raise JobError("input: a chat JSONL under the packs root") from exc
        if not chat.is_file():
            raise JobError("input: a chat JSONL under the packs root")
        argv = ["train", "hf-sft", "--model", str(model), "--input", str(chat), "--out-dir", str(out_dir),
                "--max-steps", str(_int(form, "max_steps", 1, 1_000_000, 100)),
                "--max-length", str(_int(form, "max_length", 16, 32768, 512)),
                "--peft", _choice(form, "peft", ("lora", "none"), "lora"),
                "--quantize", _choice(form, "quantize", ("none", "4bit"), "none"), "--no-progress"]
    else:
        raise JobError("command must be run-tiny or hf-sft")
    argv += ["--device", _choice(form, "device", DEVICES, "cpu")]
    precision = _choice(form, "precision", PRECISIONS)
    if precision:
        argv += ["--precision", precision]
    return argv, out_dir


@dataclass
class Job:
    id: str
    argv: list[str]
    out_dir: Path
    log: Path
    process: subprocess.Popen
    started: float = field(default_factory=time.time)
    cancelled: bool = False

    def status(self) -> str:
        code = self.process.poll()
        if code is None:
            return "running"
        if code == 0:
            return "finished"
        return "cancelled" if self.cancelled else ("interrupted" if code == 3 else "failed")

    def as_dict(self, tail_bytes: int = 6000) -> dict[str, Any]:
        try:
            with open(self.log, "rb") as fh:
                size = fh.seek(0, 2)
                fh.seek(max(0, size - tail_bytes))
                tail = fh.read().decode("utf-8", "replace")
        except OSError:
            tail = ""
        return {"id": self.id, "command": "picochat " + " ".join(self.argv), "status": self.status(),
                "returncode": self.process.poll(), "out_dir": self.out_dir.name, "started": self.started,
                "log_tail": tail}


class JobManager:
    def __init__(self, runs_root: Path, packs_root: Path, scales: tuple[str, ...]):
        self.runs_root, self.packs_root, self.scales = runs_root, packs_root, scales
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, form: dict[str, Any]) -> Job:
        argv, out_dir = build_command(form, self.runs_root, self.packs_root, self.scales)
        log_dir = self.runs_root.resolve() / ".picochat-web" / "jobs"
        log_dir.mkdir(parents=True, exist_ok=True)
        job_id = uuid.uuid4().hex[:12]
        log = log_dir / f"{job_id}.log"
        with self._lock:
            if any(j.out_dir == out_dir and j.status() == "running" for j in self.jobs.values()):
                raise JobError(f"a job already writes {out_dir.name}")
            with open(log, "wb") as fh:
                process = subprocess.Popen([sys.executable, "-m", "picochat_jax.cli", *argv], stdout=fh,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=_job_env(), start_new_session=True)
            job = Job(job_id, argv, out_dir, log, process)
            self.jobs[job_id] = job
        return job

    def get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise NotFound(job_id)
        return self.jobs[job_id]

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.process.poll() is None:
            job.cancelled = True
            job.process.send_signal(signal.SIGTERM)
        return job

    def close(self, timeout: float = 10.0) -> None:
        for job in self.jobs.values():
            if job.process.poll() is None:
                job.process.send_signal(signal.SIGTERM)
        for job in self.jobs.values():
            try:
                job.process.wait(timeout)
            except subprocess.TimeoutExpired:
                job.process.kill()


def _job_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env
