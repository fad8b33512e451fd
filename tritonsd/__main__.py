"""`python -m tritonsd` is the `tritonsd` command (torchrun launches it this way)."""

from tritonsd.cli import main

main()
