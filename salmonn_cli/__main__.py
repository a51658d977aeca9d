"""`python -m salmonn_cli ...` is the `salmonn` command, as launchers run it (`torchrun ... -m salmonn_cli ...`)."""

from .cli.app import console

console()
