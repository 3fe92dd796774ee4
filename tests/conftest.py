"""Test session setup: 8 fake CPU devices so mesh code runs in CI exactly as on 8 accelerators.

XLA reads the flag when the backend starts, so it must be set before anything imports jax.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# XLA:CPU's older elemental emitters compile the suite's unoptimised programs in about half the time of its
# fusion emitters (three test_generate.py tests: 51-55 s -> 27-32 s, 2026-12-01, docs/performance.md).
# Only where XLA:CPU runs the tests and knows the flag: jaxlib 0.11 dropped it, and XLA aborts on an unknown flag
# (which stopped `JAX_PLATFORMS=cuda pytest tests/test_kernels.py` on an H200 with jaxlib 0.11.2).
if "xla_cpu_use_fusion_emitters" not in flags and os.environ["JAX_PLATFORMS"] == "cpu":
    from importlib.metadata import version

    if tuple(int(p) for p in version("jaxlib").split(".")[:2]) < (0, 11):
        flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = flags.strip()
# Unoptimised XLA:CPU code by default (see `_compile_level_and_free_programs`): also for run-wide fixtures and
# the CLI subprocesses that tests start.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compile cache for the test processes, their CLI subprocesses and later runs, in the system temp folder
# instead of the commands' ~/.cache/picochat/xla (cli/common.py `use_compile_cache` leaves a set
# JAX_COMPILATION_CACHE_DIR alone). Tests that run the pipeline recompile the same programs: six such files
# took 164-199 s with it against 214-231 s without, from an empty cache (2026-12-01, docs/performance.md).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(tempfile.gettempdir()) / f"picochat-tests-xla-{os.getuid()}"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 2**30))  # bounded, and file-locked
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.util  # noqa: E402
import sys  # noqa: E402
from types import ModuleType  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_PACK = REPO / "examples" / "tiny_pack" / "dataset_pack.json"


@pytest.fixture(scope="session")
def example_pack() -> Path:
    return EXAMPLE_PACK


@pytest.fixture(scope="session")
def load_tool():
    """Import a script from tools/ by path (tools/ is not a package): `load_tool("bench_train")`."""

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def web_roots(tmp_path_factory) -> tuple[Path, Path]:
    """(runs root, packs root) for the workbench tests: a finished smoke-scale `run tiny` ("alpha"), a copy
    with a slightly different loss ("beta", for compare), and a packs root holding its pack."""
    import json
    import shutil

    from picochat_jax.pipeline import RunOptions, run_tiny
    from tests.test_run_tiny_evidence import write_original_style_pack

    root = tmp_path_factory.mktemp("web")
    packs, runs = root / "packs", root / "runs"
    pack = write_original_style_pack(packs / "greetings")
    run_tiny(pack, runs / "alpha", RunOptions(progress=False, scale="smoke", base_steps=12, sft_steps=12, dpo=False))
    shutil.copytree(runs / "alpha", runs / "beta")
    summary = json.loads((runs / "beta" / "summary.json").read_text())
    summary["base"]["final_loss"] += 0.25
    (runs / "beta" / "summary.json").write_text(json.dumps(summary))
    return runs, packs


@pytest.fixture(autouse=True, scope="module")
def _compile_level_and_free_programs(request):
    """XLA:CPU compiles each test module's programs with LLVM's optimisations off, unless the module is marked
    `xla_optimized`; after the module every compiled program is dropped.

    Most of the suite's time is compiling many small programs that then run for milliseconds: 221 of
    test_generate.py's 267 s on 2 cores (2026-12-01). Unoptimised code compiles about 40% faster with the
    same math (no fast-math either way; sums may round differently in the last bits). It also runs 2-2.5x
    slower, which only a module that trains for hundreds of steps notices (`make tiny`'s run: 202 s
    optimised, 447 s not): those modules carry `pytestmark = pytest.mark.xla_optimized`.

    Dropping the programs: XLA:CPU maps memory for each executable, and the whole suite's programs, kept alive
    by JAX's caches, came to more memory maps than Linux allows a process (vm.max_map_count, 65,530): the next
    compile then crashed the run with a segmentation fault."""
    import gc

    import jax

    default = jax.config.read("jax_disable_most_optimizations")  # from JAX_DISABLE_MOST_OPTIMIZATIONS, set above
    jax.config.update("jax_disable_most_optimizations", request.node.get_closest_marker("xla_optimized") is None)
    yield
    jax.clear_caches()
    gc.collect()
    jax.config.update("jax_disable_most_optimizations", default)
