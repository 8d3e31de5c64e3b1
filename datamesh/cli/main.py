"""Argument parsing and dispatch for ``python -m datamesh``.

Each command module exposes ``register(subparsers)``, which adds its parser and sets ``handler``
to a function taking the parsed arguments and a configuration and returning an exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from datamesh import observability
from datamesh.cli import ap, demo, index, keys, maintenance, metrics, objects, serve
from datamesh.core.config import DataMeshConfig
from datamesh.workers import cli as workers_cli

COMMANDS = (demo, maintenance, objects, ap, index, metrics, keys, serve, workers_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m datamesh",
        description="datamesh: storage for conversational-AI data across CP, AP, object and index tiers. "
        "Configuration comes from DATAMESH_* variables (see the README). Without a command, runs the demo.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        args = parser.parse_args(["demo"])
    config = DataMeshConfig.from_env()
    if config.is_err():
        print(f"error: {config.error}", file=sys.stderr)
        return 2
    observability.configure(config.unwrap())
    try:
        code: int = args.handler(args, config.unwrap())
    finally:
        observability.tracing.shutdown()  # flush kept spans before the process exits
    return code
