"""`python -m rlino` runs the command-line app."""

from rlino.cli import app

app()
