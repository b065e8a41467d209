"""CLI subcommands: one module per command group, each with ``register(subparsers, parents)``.

A command's handler takes the parsed arguments and the effective settings and returns the exit
code. Everything a user can do in the TUI has a command here, for scripts and headless servers.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Protocol

from webaims_tui.config import Settings

Handler = Callable[[argparse.Namespace, Settings], int]


class CommandModule(Protocol):
    def register(
        self, subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]
    ) -> None: ...
