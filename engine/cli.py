"""How every ``loom-*`` command and ``tools/*.py`` entry point ends on a user's mistake: one line, exit 2.

    @cli.entry
    def main(argv=None) -> int: ...

A bad config key, a bad checkpoint or HF directory, a bad data sample or a missing file is the user's to
fix, and the message already names the key, the file or ``file:line``: the traceback would only bury it.
So is a tool's own ``SystemExit("message")`` (an exit status of 1 alone, e.g. a failed ``--check``, stays
as it is). Anything else is a bug and keeps its traceback. Light on purpose: an error class is looked up only in the
modules already imported (one never imported cannot have been raised), so ``--help`` imports no torch.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable

# (module, class): what a user's input can raise, by the module that defines it.
USER_ERRORS = (
    ("loom.config.errors", "ConfigError"),
    ("loom.checkpoint.storage", "CheckpointError"),
    ("loom.model.hf.naming", "ConversionError"),
    ("loom.data.multimodal", "BadSampleError"),
)
EXIT_USER_ERROR = 2


def user_errors() -> tuple[type, ...]:
    """The user-error classes of the modules imported so far, plus a missing or unreadable file."""
    found = [vars(sys.modules[module])[name] for module, name in USER_ERRORS if module in sys.modules]
    return (*found, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def one_line(error: BaseException) -> str:
    """``error``'s message on one line (a multi-line message keeps its first line and says so)."""
    text = str(error).strip() or type(error).__name__
    first, _, rest = text.partition("\n")
    return f"{first} (...)" if rest.strip() else first


def command_name(module: str = "__main__") -> str:
    """What the user typed: ``memory`` for ``tools/memory.py`` or ``loom.tools.memory``, else argv[0]'s name."""
    name = module.rpartition(".")[2]
    if name == "__main__":
        name = os.path.basename(sys.argv[0]).removesuffix(".py") or "loom"
    return name


def report(error: BaseException, prog: str | None = None) -> int:
    """Print ``prog: error: MESSAGE`` on stderr (``config error`` for a config key); return 2."""
    prog = prog or command_name()
    kind = "config error" if type(error).__name__ == "ConfigError" else "error"
    message = one_line(error).removeprefix(f"{prog}: ")  # a tool's SystemExit may name itself already
    print(f"{prog}: {kind}: {message}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command's ``main(argv=None)``: a user error prints one line and returns 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except SystemExit as e:
            if isinstance(e.code, str):
                return report(e, command_name(main.__module__))
            raise
        except Exception as e:  # noqa: BLE001 - only the user errors are caught; the rest re-raises
            if isinstance(e, user_errors()):
                return report(e, command_name(main.__module__))
            raise

    return wrapped
