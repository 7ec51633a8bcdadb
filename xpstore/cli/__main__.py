"""``python -m xpstore.cli``: the same as the ``xpstore`` command."""

from xpstore.cli.commands import run

run()
