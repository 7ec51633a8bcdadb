"""The ``xpstore`` command line: a thin layer over the public API (see docs/cli.md)."""

from xpstore.cli import (
    data_cmds,
    index_cmds,
    inspect_cmds,
    learn_cmds,
    maintenance_cmds,
    recover_cmds,
    sample_cmds,
    service_cmds,
    snapshot_cmds,
    tune_cmds,
    validate_cmds,
)
from xpstore.cli._errors import EXIT_CODES, exit_code_for
from xpstore.cli.commands import main, run

# the command modules register themselves on ``main`` when imported
_COMMAND_MODULES = (
    data_cmds, index_cmds, inspect_cmds, learn_cmds, maintenance_cmds, recover_cmds, sample_cmds,
    service_cmds, snapshot_cmds, tune_cmds, validate_cmds,
)

__all__ = ["EXIT_CODES", "exit_code_for", "main", "run"]
