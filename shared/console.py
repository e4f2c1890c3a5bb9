"""The rich console the commands and the coordinator print to.

On a terminal it is rich's own (the terminal's width). When standard output is not a
terminal (a file, a pipe, a CI log, ``flwr run``'s stream of the ServerApp) rich would
assume 80 columns and shrink tables and hard-wrap lines to fit; a log read later, or
grepped, is better served by long lines: such output gets at least :data:`PIPED_WIDTH`
columns (``COLUMNS`` still wins when set).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, ConsoleDimensions

PIPED_WIDTH = 200


class OutputConsole(Console):
    """A :class:`rich.console.Console` that is :data:`PIPED_WIDTH` wide when it does not write
    to a terminal and no width was given (neither ``width=`` nor ``COLUMNS``)."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._width is None and not self.is_terminal and not self._environ.get("COLUMNS", "").isdigit():
            return ConsoleDimensions(max(size.width, PIPED_WIDTH), size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        width, height = new_size
        self._width, self._height = width, height


def output_console(**kwargs: Any) -> Console:
    """The console for a command's or the coordinator's output (see the module docstring)."""
    return OutputConsole(**kwargs)
