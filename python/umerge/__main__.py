"""`python -m umerge` runs the CLI."""

from umerge.cli import main

main()
