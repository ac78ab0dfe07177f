"""The error every command of ``python -m pipelines.run`` raises for a mistake its user can fix.

In a module of its own so that the command modules import it while ``pipelines.run`` imports them.
"""

from __future__ import annotations


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""
