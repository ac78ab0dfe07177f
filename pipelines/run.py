"""The command line: ``python -m pipelines.run <command>`` (also installed as ``image-pipeline``).

Each group of commands lives in its own module and adds itself here through ``add_commands(subparsers)``;
modules import the SageMaker SDK and boto3 lazily so ``local`` starts fast and works with no AWS account.
A command reports a mistake its user can fix by raising :class:`pipelines.util.errors.CommandError`.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Sequence

from pipelines.util.errors import CommandError

# Modules that contribute subcommands, in the order ``--help`` lists them.
COMMAND_MODULES = (
    "pipelines.cli.sagemaker",  # definition, upsert, start, status, models, approve, reject (each with --local)
    "pipelines.cli.deploy",  # deploy
    "pipelines.cli.local",  # local, predict, endpoint (and the older local-status, local-models)
    "pipelines.cli.endpoint_test",  # endpoint-test
    "pipelines.cli.bootstrap",  # bootstrap
    "pipelines.cli.iam",  # iam pipeline-policy | pipeline-trust-policy | deploy-policy | deploy-trust-policy
    "pipelines.demo_data",  # demo-data
    "pipelines.cli.wheelhouse",  # wheelhouse
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.run",
        description="Build, run and deploy the image-classification pipeline, on SageMaker or on this machine.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(subparsers)
    return parser


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so that a command unwinds and cleans up."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


def _interrupt(number: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(number).name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handled = (signal.SIGTERM, signal.SIGHUP) if threading.current_thread() is threading.main_thread() else ()
    previous = {number: signal.signal(number, _interrupt) for number in handled}
    try:
        result = args.func(args)
    except CommandError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # what the command started (an endpoint's server, a job) it stopped
        name = getattr(stop, "signal_name", "SIGINT")
        print(f"interrupted by {name}", file=sys.stderr)
        return 128 + signal.Signals[name].value
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
