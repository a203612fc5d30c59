"""`ringlinear` command line. Subcommands live next to their code and register themselves here:

- generate, info, demo: ringlinear/cli_model.py
- train, convert:       ringlinear/train/cli.py   (function `register(subparsers)`)
- sweep:                ringlinear/sweep/cli.py
- serve:                ringlinear/server/cli.py  (function `register(subparsers)`)
- rl:                   ringlinear/rl/cli.py

Each `register` adds its parser and sets `func` (called with the parsed args; returns an exit code). Modules are
imported lazily so `ringlinear info` works without the training or server dependencies installed.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

_PLUGINS = ("ringlinear.cli_model", "ringlinear.train.cli", "ringlinear.sweep.cli", "ringlinear.server.cli",
            "ringlinear.rl.cli")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringlinear", description="Ring-linear-2.0 hybrid models: run, train, serve.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _PLUGINS:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("ringlinear"):
                continue  # that part of the package is not present in this build
            raise
        m.register(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError) as e:  # bad input: one clear line, no traceback
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
