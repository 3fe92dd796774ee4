"""Options and error handling shared by the command modules."""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import click

from picochat_jax.data.records import DataError

# Compiled programs kept between runs are evicted least recently used beyond this many bytes.
COMPILE_CACHE_MAX_BYTES = 2 * 2**30
COMPILE_CACHE_OFF = ("off", "none", "0", "false")


def compile_cache_dir(environ: Mapping[str, str]) -> Path | None:
    """The folder that keeps compiled XLA programs between processes: PICOCHAT_COMPILE_CACHE (a folder, or `off`),
    else $XDG_CACHE_HOME/picochat/xla (~/.cache/picochat/xla). None when off, or when JAX_COMPILATION_CACHE_DIR
    already names one: JAX reads that itself."""
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    chosen = environ.get("PICOCHAT_COMPILE_CACHE", "").strip()
    if chosen.lower() in COMPILE_CACHE_OFF:
        return None
    if chosen:
        return Path(chosen).expanduser()
    return Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "picochat" / "xla"


def use_compile_cache(environ: Mapping[str, str] = os.environ) -> Path | None:
    """Point JAX's persistent compilation cache at `compile_cache_dir`, before the first compile: a rerun, a
    resumed run or a new process of the same shapes loads its programs instead of compiling them again (the
    key covers the program, the compile options, XLA flags, devices and the jax version). Returns the folder,
    or None when off or unusable (a warning says why; runs then compile as before)."""
    import jax

    path = compile_cache_dir(environ)
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        warnings.warn(f"{path}: cannot keep compiled programs there ({exc.strerror}); every run compiles afresh "
                      "(set PICOCHAT_COMPILE_CACHE to another folder, or to off)", stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    try:  # JAX's size bound (and its file lock between processes) needs filelock, which transformers brings
        import filelock  # noqa: F401
    except ImportError:
        return path
    jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)
    return path


def select_device(device: str | None) -> None:
    """Pin JAX to a platform before anything touches a backend, keep compiled programs between runs
    (`use_compile_cache`), and join a multi-host job when asked.

    Multi-host (TPU pod slices, multi-node GPUs): start one process per host with PICOCHAT_DISTRIBUTED=1
    (and, off TPU/SLURM, JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); see docs/multihost.md.
    """
    import jax

    use_compile_cache()
    if device:
        jax.config.update("jax_platforms", {"cuda": "cuda", "gpu": "cuda", "tpu": "tpu", "cpu": "cpu"}[device])
    if os.environ.get("PICOCHAT_DISTRIBUTED") == "1":
        kwargs = {}
        if os.environ.get("JAX_COORDINATOR_ADDRESS"):
            kwargs = {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"],
                      "num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
                      "process_id": int(os.environ["JAX_PROCESS_ID"])}
        jax.distributed.initialize(**kwargs)


device_option = click.option("--device", type=click.Choice(["cpu", "cuda", "tpu"]), default=None,
                             help="Accelerator platform (default: whatever JAX finds first).")
mesh_option = click.option("--mesh", default=None, metavar="DATAxFSDP[xTENSOR]",
                           help="Device mesh, e.g. 1x8, 2x4, 1x4x2 (default: all devices on the data axis).")
precision_option = click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
                                help="Compute precision; master weights stay float32 (default: the scale's).")


@contextlib.contextmanager
def plain_warnings() -> Iterator[None]:
    """Show library warnings (e.g. prompts cut to fit the context) as one `warning:` line each."""

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        click.echo(f"warning: {message}", err=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


class UserError(click.ClickException):
    """An error the user can act on: one `Error:` line, exit code 2 (1 stays free for "the gate blocked")."""

    exit_code = 2


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can act on into one clear line and exit code 2, not a traceback; library
    warnings become one line each."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with plain_warnings():
                return fn(*args, **kwargs)
        except (DataError, FileNotFoundError, ValueError) as exc:
            raise UserError(str(exc)) from exc
        except IsADirectoryError as exc:
            raise UserError(f"{exc.filename}: is a folder, expected a file") from exc
        except PermissionError as exc:
            raise UserError(f"{exc.filename}: permission denied") from exc

    return wrapper


def scale_option(help_text: str = "Named scale (configs/NAME.yaml) or a path to a YAML file.") -> Any:
    from picochat_jax.config import available_scales

    return click.option("--scale", default="pico", show_default=True, metavar="NAME|PATH.yaml",
                        help=f"{help_text} Named: {', '.join(available_scales())}.")


set_option = click.option("--set", "sets", multiple=True, metavar="KEY.SUB=VALUE",
                          help="Override any key of the config tree, e.g. --set base.learning_rate=1e-3 "
                               "--set dpo.beta=0.2 (repeatable; unknown keys are errors).")


@functools.cache
def _config_defaults() -> Any:
    from picochat_jax.config import load_defaults

    return load_defaults()


def config_default(section: str, key: str) -> str:
    """Help text for a flag whose default comes from the config tree: where, and what configs/base.yaml says."""
    value = getattr(getattr(_config_defaults(), section), key)
    return f"[default: {section}.{key} in the config tree, {value}]"


def resolve_flags(values: dict[str, Any], section: Any) -> dict[str, Any]:
    """Flags left unset (None) take the value of the same-named key of a config section."""
    return {k: (getattr(section, k) if v is None and hasattr(section, k) else v) for k, v in values.items()}


def out_dir_flags(resume: bool = True) -> Callable[[Any], Any]:
    """--overwrite (and --resume / --resume-or-start) for commands that write a folder (outdir.py policy)."""
    options = [click.option("--overwrite", is_flag=True,
                            help="Replace an earlier output of this command in --out-dir (never a folder picochat "
                                 "did not create, nor one that holds this command's inputs).")]
    if resume:
        options += [click.option("--resume", is_flag=True, help="Continue the interrupted run in --out-dir."),
                    click.option("--resume-or-start", is_flag=True,
                                 help="Continue the run in --out-dir if it has a checkpoint, else start it.")]

    def decorate(fn: Any) -> Any:
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return decorate


def input_or_pack_file(input_path: Path | None, pack_path: Path | None, key: str) -> Path:
    """The file a command reads: --input, or the pack's `key` file (chat, eval, preferences) — exactly one."""
    from picochat_jax.data.pack import load_pack

    if (input_path is None) == (pack_path is None):
        raise click.UsageError("give exactly one of --input or --dataset-pack")
    if input_path is not None:
        return input_path
    path = getattr(load_pack(pack_path), key)
    if path is None:
        raise click.UsageError(f"{pack_path} names no '{key}' file")
    return path
