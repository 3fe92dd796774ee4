"""`picochat` command line. Thin: parse and validate flags, call library functions, print results.

Each command family lives in its own module and registers itself on `main` below.
"""

from __future__ import annotations

import click

from picochat_jax.cli import chat as chat_cli
from picochat_jax.cli import data, run, tokenizer, train
from picochat_jax.cli import dpo as dpo_cli
from picochat_jax.cli import eval as eval_cli
from picochat_jax.cli import gate as gate_cli
from picochat_jax.cli import hf as hf_cli
from picochat_jax.cli import runs as runs_cli
from picochat_jax.cli import serve as serve_cli
from picochat_jax.cli import web as web_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="picochat-jax")
def main() -> None:
    """picochat-jax: train small chat models from scratch, fine-tune HF models, evaluate, gate and serve."""


main.add_command(data.data)
main.add_command(tokenizer.tokenizer)
main.add_command(train.train)
main.add_command(run.run)
main.add_command(gate_cli.gate)
train.train.add_command(dpo_cli.dpo)
main.add_command(hf_cli.export)
main.add_command(hf_cli.import_group)
train.train.add_command(hf_cli.hf_sft)
train.train.add_command(hf_cli.hf_dpo)
main.add_command(eval_cli.eval_group)
main.add_command(chat_cli.chat)
main.add_command(serve_cli.serve)
main.add_command(web_cli.web)
run.run.add_command(runs_cli.bundle)
run.run.add_command(runs_cli.inspect_bundle_cmd)
main.add_command(runs_cli.compare)
main.add_command(runs_cli.registry)

if __name__ == "__main__":
    main()
