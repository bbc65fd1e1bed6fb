"""Running the task's code as `python3 script.py` would (in the task's child, or a session's interpreter):
a fresh `__main__`, the sandbox's fds 0-2 as the std streams, the exit status an interpreter gives, its
traceback without the runner's frame, and the interpreter's own exit (threads, atexit, flush)."""

import atexit
import builtins
import linecache
import os
import sys
import traceback
import types
from collections.abc import Callable
from typing import Any

from runner_image.sandbox.config import STATUS_FD, STATUS_MEMORY_ERROR

_KEEP: list[Any] = []  # in the task child: the runner's own std streams, kept alive


def run_code(code: str, compiled: types.CodeType | None = None, at_end: Callable[[], object] | None = None) -> int:
    """Run the task as `python3 script.py` would, on the sandbox's fds 0-2; return the exit status.
    `at_end` runs when the code has ended, before the atexit handlers (matplotlib's closes every figure)."""
    main = task_main()
    linecache.cache["<task>"] = (len(code), None, code.splitlines(True), "<task>")  # source in tracebacks
    try:
        exec(compiled if compiled is not None else compile(code, "<task>", "exec"), main.__dict__)
        status = 0
    except SystemExit as exc:
        status = exit_status(exc.code)
    except BaseException as exc:
        if isinstance(exc, MemoryError):
            try:
                os.write(STATUS_FD, STATUS_MEMORY_ERROR)
            except OSError:
                pass
        status = 1
        report(exc)
    if at_end is not None:
        at_end()
    return shut_down(status)


def task_main() -> types.ModuleType:
    """Point the std streams at the sandbox's fds 0-2 and give the code a fresh `__main__` module."""
    _KEEP.append((sys.stdin, sys.stdout, sys.stderr))  # freed, the runner's streams would close fds 0-2
    for name, stream in (("stdin", open(0, encoding="utf-8", errors="surrogateescape")),
                         ("stdout", open(1, "w", encoding="utf-8", errors="surrogateescape")),
                         ("stderr", open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace"))):
        setattr(sys, name, stream)  # stderr line-buffered, as in python3
        setattr(sys, f"__{name}__", stream)
    sys.argv = ["<task>"]
    main = types.ModuleType("__main__")  # so that `import __main__` and pickle see the task, not us
    main.__builtins__ = builtins  # type: ignore[attr-defined]  # what the interpreter gives every __main__
    sys.modules["__main__"] = main
    return main


def exit_status(code: object) -> int:
    """The exit status `raise SystemExit(code)` gives, printing `code` when it is not a number."""
    if code is None or isinstance(code, int):
        return (code or 0) & 0xFF
    try:
        print(code, file=sys.stderr)
    except BaseException:
        pass
    return 1


def report(exc: BaseException) -> None:
    """Print an uncaught exception as the interpreter would, without the runner's own frame."""
    if exc.__traceback__ is not None:
        exc.__traceback__ = exc.__traceback__.tb_next
    try:
        if sys.excepthook is sys.__excepthook__:
            traceback.print_exception(exc)  # unlike the C hook, it reads the task's source from linecache
        else:
            sys.excepthook(type(exc), exc, exc.__traceback__)
    except BaseException:
        pass


def shut_down(status: int) -> int:
    """What the interpreter does at exit: wait for non-daemon threads, run atexit, flush."""
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()  # what the interpreter calls at exit
        atexit._run_exitfuncs()
    except BaseException:
        pass
    return flush_streams(status)


def flush_streams(status: int) -> int:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):  # the task may have swapped them
        try:
            if stream is not None and not stream.closed:
                stream.flush()
        except BaseException:
            status = status or 120  # as the interpreter does when it cannot flush stdout
    return status
