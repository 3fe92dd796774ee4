"""The persistent compilation cache every command turns on (cli/common.py `use_compile_cache`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from picochat_jax.cli.common import compile_cache_dir

# A child process: turn the cache on from the given environment, compile and run one program, and report
# (cache folder, cache hits, result). Run in a subprocess so that this test process's JAX config is untouched.
CHILD = """
import json, sys
import jax, jax.numpy as jnp
from picochat_jax.cli.common import use_compile_cache
hits = []
jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
folder = use_compile_cache()
x = jnp.arange(64.0).reshape(8, 8)
value = float(jax.jit(lambda a: jnp.tanh(a @ a.T / 100).sum())(x))
print(json.dumps({"folder": None if folder is None else str(folder), "hits": len(hits), "value": value}))
"""


def _child(env: dict[str, str]) -> tuple[dict, str]:
    """The child's report and its stderr (every warning shown)."""
    done = subprocess.run([sys.executable, "-W", "always", "-c", CHILD], env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "PICOCHAT_COMPILE_CACHE")}
    # Cache even this small program (JAX keeps only compiles of at least a second by default).
    return {**env, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **extra}


def test_default_folder_follows_xdg_and_the_override_and_off_win(tmp_path):
    assert compile_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "picochat" / "xla"
    assert compile_cache_dir({}) == Path.home() / ".cache" / "picochat" / "xla"
    assert compile_cache_dir({"PICOCHAT_COMPILE_CACHE": str(tmp_path / "c"), "XDG_CACHE_HOME": "/x"}) == tmp_path / "c"
    for off in ("off", "OFF", "none", "0", "false"):
        assert compile_cache_dir({"PICOCHAT_COMPILE_CACHE": off}) is None
    # JAX reads its own variable: the user's choice stands and picochat sets nothing.
    assert compile_cache_dir({"JAX_COMPILATION_CACHE_DIR": "/elsewhere", "PICOCHAT_COMPILE_CACHE": "/x"}) is None


@pytest.mark.slow
def test_a_second_process_loads_the_compiled_program_and_computes_the_same(tmp_path):
    folder = tmp_path / "xla"
    first, _ = _child(_env(PICOCHAT_COMPILE_CACHE=str(folder)))
    assert first["folder"] == str(folder) and first["hits"] == 0
    entries = sorted(p.name for p in folder.iterdir() if p.name.endswith("-cache"))
    assert entries, "the first process wrote no compiled program"
    second, _ = _child(_env(PICOCHAT_COMPILE_CACHE=str(folder)))
    assert second["hits"] >= 1 and second["value"] == first["value"]
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith("-cache")) == entries  # loaded, not rebuilt


def test_off_writes_nothing_and_an_unusable_folder_warns_and_compiles_as_before(tmp_path):
    home = tmp_path / "home"
    off, _ = _child(_env(PICOCHAT_COMPILE_CACHE="off", XDG_CACHE_HOME=str(home)))
    assert off["folder"] is None and not home.exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    unusable, stderr = _child(_env(PICOCHAT_COMPILE_CACHE=str(blocker / "xla")))
    assert unusable["folder"] is None
    assert "cannot keep compiled programs there" in stderr and blocker.read_text() == "not a folder"
