"""Options and error handling shared by the command modules."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from picochat_jax.data.records import DataError


def select_device(device: str | None) -> None:
    """Pin JAX to a platform before anything touches a backend."""
    if device:
        import jax

        jax.config.update("jax_platforms", {"cuda": "cuda", "gpu": "cuda", "tpu": "tpu", "cpu": "cpu"}[device])


device_option = click.option("--device", type=click.Choice(["cpu", "cuda", "tpu"]), default=None,
                             help="Accelerator platform (default: whatever JAX finds first).")
mesh_option = click.option("--mesh", default=None, metavar="DATAxFSDP[xTENSOR]",
                           help="Device mesh, e.g. 1x8, 2x4, 1x4x2 (default: all devices on the data axis).")
precision_option = click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
                                help="Compute precision; master weights stay float32 (default: the scale's).")


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can act on into one clear line and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (DataError, FileNotFoundError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
        except RuntimeError as exc:
            if type(exc).__name__ == "OutDirInUse":
                raise click.ClickException(str(exc)) from exc
            raise

    return wrapper
