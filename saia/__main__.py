"""`python -m saia` is the `saia` command (the demo starts its parts this way)."""

from saia.cli import main

main()
