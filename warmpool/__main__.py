"""`python -m warmpool` is the `warmpool` command."""

from warmpool.cli import main

main()
