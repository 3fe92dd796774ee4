"""`picochat run bundle|inspect-bundle`, `picochat compare`, `picochat registry add|list|show`."""

from __future__ import annotations

from pathlib import Path

import click

from picochat_jax.cli.common import UserError, friendly_errors


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="The bundle to write (.tgz); it must not exist yet.")
@friendly_errors
def bundle(run_dir: Path, out_path: Path) -> None:
    """Pack RUN_DIR's gated model, tokenizer and evidence with a manifest of sha256 checksums into one .tgz."""
    from picochat_jax.runs import bundle_run

    manifest = bundle_run(run_dir, out_path)
    size = sum(f["bytes"] for f in manifest["files"])
    click.echo(f"bundled {len(manifest['files'])} files ({size:,} bytes; model {manifest['model']}, gate "
               f"{manifest['decision']}) -> {out_path}")


@click.command(name="inspect-bundle")
@click.argument("bundle_path", type=click.Path(path_type=Path))
@click.option("--no-card", is_flag=True, help="Do not print the release card.")
@friendly_errors
def inspect_bundle_cmd(bundle_path: Path, no_card: bool) -> None:
    """Verify every file of a bundle against its manifest (nothing is extracted) and print its release card.
    Exits 1 when a file is missing, unexpected or changed."""
    from picochat_jax.runs import inspect_bundle

    result = inspect_bundle(bundle_path)
    m = result["manifest"]
    click.echo(f"bundle of run {m['run']} ({m['created']}): {len(m['files'])} files, model {m['model']}, gate "
               f"{m['decision']} ({m['profile']})")
    if not no_card and result["card"]:
        click.echo(result["card"])
    if result["problems"]:
        for p in result["problems"]:
            click.echo(f"error: {p}", err=True)
        raise SystemExit(1)
    click.echo("every checksum matches")


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out-dir", type=click.Path(path_type=Path), default=None,
              help="Also write compare.md and compare.png (loss curves overlaid) into this new or empty folder.")
@friendly_errors
def compare(run_dirs: tuple[Path, ...], out_dir: Path | None) -> None:
    """Compare runs: one table of final losses, BPB, eval pass rate, gate and wall time, with each run's
    difference to the first."""
    from picochat_jax.outdir import check_out_dir, claim_out_dir
    from picochat_jax.runs import compare_runs

    if out_dir is not None:
        claim_out_dir(check_out_dir(out_dir, "compare", resumable=False, inputs=list(run_dirs)))
    table, _ = compare_runs(list(run_dirs), out_dir)
    click.echo(table, nl=False)
    if out_dir is not None:
        click.echo(f"-> {out_dir / 'compare.md'}, {out_dir / 'compare.png'}")


@click.group()
def registry() -> None:
    """Released runs, kept in a SQLite file (--registry, default ~/.local/share/picochat/registry.sqlite)."""


registry_option = click.option("--registry", "registry_path", type=click.Path(path_type=Path), default=None,
                               envvar="PICOCHAT_REGISTRY", help="The registry file.")


@registry.command(name="add")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Name in the registry (default: the folder's name).")
@click.option("--allow-blocked", is_flag=True, help="Record a run the gate blocked (it is listed as blocked).")
@registry_option
@friendly_errors
def registry_add(run_dir: Path, name: str | None, allow_blocked: bool, registry_path: Path | None) -> None:
    """Record a gated run (its verdict, profile, model and release card)."""
    from picochat_jax.runs import Registry

    reg = Registry(registry_path)
    try:
        entry = reg.add(run_dir, name, allow_blocked)
    finally:
        reg.close()
    click.echo(f"added {entry['name']} ({entry['decision']}, profile {entry['profile']}) -> {reg.path}")


@registry.command(name="list")
@registry_option
@friendly_errors
def registry_list(registry_path: Path | None) -> None:
    """Every registered run."""
    from picochat_jax.runs import Registry

    reg = Registry(registry_path)
    rows = reg.list()
    reg.close()
    if not rows:
        click.echo(f"no runs in {reg.path}")
        return
    click.echo("| name | decision | profile | model | added | path |\n|---|---|---|---|---|---|")
    for r in rows:
        click.echo(f"| {r['name']} | {r['decision']} | {r['profile']} | {r['model']} | {r['added']} | {r['path']} |")


@registry.command(name="show")
@click.argument("name")
@registry_option
@friendly_errors
def registry_show(name: str, registry_path: Path | None) -> None:
    """One registered run: where it is, its verdict and its release card."""
    from picochat_jax.runs import Registry

    reg = Registry(registry_path)
    try:
        entry = reg.show(name)
    except KeyError as exc:
        raise UserError(str(exc.args[0])) from exc
    finally:
        reg.close()
    click.echo(f"{entry['name']}: {entry['decision']} (profile {entry['profile']}), model {entry['model']}, "
               f"added {entry['added']}\npath: {entry['path']}\n")
    click.echo(entry["card"] or "(no release card)")
