"""`python -m picochat_jax.cli ...` is the `picochat` command (the workbench starts jobs this way)."""

from picochat_jax.cli import main

main()
