"""`picochat web`: the workbench in the browser (runs, evidence, compare, data, chat, jobs)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import click

from picochat_jax.cli.common import friendly_errors


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.option("--runs-root", type=click.Path(path_type=Path, file_okay=False), default=Path("runs"),
              show_default=True, help="Folder whose run folders (run tiny, hf-sft, hf-dpo) the workbench shows; "
                                      "jobs it starts write new folders here.")
@click.option("--packs-root", type=click.Path(path_type=Path, file_okay=False), default=Path("."),
              show_default=True, help="Folder searched for dataset_pack.json files (three folders deep).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on; anything but loopback needs --auth-token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--auth-token", envvar="PICOCHAT_WEB_TOKEN", show_envvar=True, default=None,
              help="Require this token on every route (sign in at /login, or send 'Authorization: Bearer TOKEN').")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Compute precision of the models the chat page loads.")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@friendly_errors
def web(runs_root: Path, packs_root: Path, host: str, port: int, auth_token: str | None, precision: str,
        log_level: str) -> None:
    """Serve the workbench: runs with live curves, evidence, compare, dataset packs, chat and a job launcher."""
    if not is_loopback(host) and not auth_token:
        raise click.UsageError(f"--host {host} exposes the workbench beyond this machine: give --auth-token "
                               "(or PICOCHAT_WEB_TOKEN), or keep the default --host 127.0.0.1")
    if not packs_root.is_dir():
        raise click.UsageError(f"--packs-root {packs_root} is not a folder")
    import uvicorn

    from picochat_jax.web.app import WebSettings, create_web_app

    runs_root.mkdir(parents=True, exist_ok=True)
    app = create_web_app(WebSettings(runs_root=runs_root, packs_root=packs_root, auth_token=auth_token,
                                     precision=precision))
    click.echo(f"picochat workbench on http://{host}:{port}/ (runs {runs_root.resolve()}, packs "
               f"{packs_root.resolve()}){'; token required' if auth_token else ''}")
    uvicorn.run(app, host=host, port=port, log_level=log_level)
