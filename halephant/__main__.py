"""`python -m halephant` is the `halephant` command."""

from halephant.cli import main

main()
