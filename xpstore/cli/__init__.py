"""The ``xpstore`` command line: a thin layer over the public API (see docs/cli.md)."""

from xpstore.cli.commands import main

__all__ = ["main"]
