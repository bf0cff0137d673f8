"""`python -m umerge.cli` runs the CLI."""

from umerge.cli import main

main()
