"""How the command-line programs end: 0 ok, 1 runtime error, 2 bad usage or configuration.

`edged` and `edged-registry` share this, so both print an error the same way: one line,
prefixed with the program's name, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from edged.config import ConfigError
from edged.errors import EdgedError


def run_command(program: str, func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run one subcommand and turn what it raised into a line on stderr and an exit code."""
    try:
        code = func(args)
        sys.stdout.flush()  # here, so that a closed pipe is seen below, not at exit
        return code
    except BrokenPipeError:
        # The reader went away (`edged models list | head -1`): stop quietly, as `ls | head` does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a program killed by it
    except ConfigError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{program}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except (EdgedError, ValueError) as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        logging.shutdown()
