"""`python -m serve ...` is `moe-serve ...`."""

from serve.cli import main

main()
