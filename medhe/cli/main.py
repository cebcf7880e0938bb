"""The `medhe` command: argparse subcommands registered by the modules in COMMAND_MODULES.

Each command module exposes `register(subparsers)`, which adds its subparsers and sets
`func(args) -> int` on each. Add a command group by appending its module to COMMAND_MODULES.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from medhe import __version__
from medhe.errors import MedHEError

COMMAND_MODULES = ["medhe.cli.train_cmd", "medhe.cli.he_cmd", "medhe.cli.batch_cmd", "medhe.cli.service_cmd"]

EXIT_OK = 0
EXIT_ERROR = 2  # usage errors (argparse) and MedHEError alike
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 1
EXIT_SOME_SKIPPED = 3  # `medhe diagnose`: the readable images were diagnosed, some others could not be read


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medhe",
        description="Privacy-preserving medical image diagnosis with CKKS homomorphic encryption.",
    )
    parser.add_argument("--version", action="version", version=f"medhe {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def _stdout_is_gone() -> bool:
    """True if stdout is a pipe whose reader has closed it (poll reports an error on the write end);
    stdout then points at /dev/null (Python's advice), so that flushing it at exit does not fail again."""
    import os
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # stdout is not a real file (a capture object)
        return False
    if not hasattr(select, "poll"):  # not on Windows
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not any(events & select.POLLERR for _, events in poller.poll(0)):
        return False
    os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    from medhe.train.cpu_kernels import pin_cpu_kernels

    pin_cpu_kernels()  # before anything imports torch: same training bits on every x86-64 CPU
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: return argparse's code
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    command = " ".join(filter(None, (args.command, getattr(args, "batch_command", None))))
    try:
        return int(func(args) or EXIT_OK)
    except BrokenPipeError as exc:
        if not _stdout_is_gone():  # another pipe (a helper's, a socket) broke: an error like any other
            print(f"medhe {command}: error: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_ERROR
        return EXIT_BROKEN_PIPE  # the reader went away (`medhe ... | head`): nothing left to tell it
    except MedHEError as exc:
        print(f"medhe {command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # a path the user gave is missing, a directory, a file, not writable...
        where = f": {exc.filename}" if exc.filename else ""
        print(f"medhe {command}: error: {exc.strerror or exc or type(exc).__name__}{where}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
