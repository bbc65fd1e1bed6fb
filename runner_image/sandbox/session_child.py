"""A session's interpreter (a task child whose go message said "session"): it serves every call of its
one session in one `__main__`, so globals, imports and files persist; it never serves anyone else. PID 1
ends it (and resets the container as after a task) when the session ends.

Each call may bring files (written under the working directory before its code runs, replacing what is
there) and `outputs` globs (collected after it, with the figures it showed or left open, and sent on the
files pipe before the call's done record), exactly as a task's child does (taskfiles)."""

import linecache
import os
import signal
import sys
import types
from typing import NoReturn

from runner_image.sandbox import execute, go_pipe, taskfiles
from runner_image.sandbox.config import CALL_DONE, CALL_MEMORY_ERROR, FILES_FD, GO_FD, STATUS_FD, STATUS_READY, WORK_DIR
from runner_image.sandbox.fdio import write_all
from runner_image.sandbox.limits import apply_task_limits

_in_call = [False]


def session_child(fsize_limit: int, nofile_limit: int, nproc_limit: int) -> NoReturn:
    """Body of a session's interpreter: set the session's limits, say ready, then run each call PID 1 sends
    in one `__main__`, reporting each call's end on the status pipe, until PID 1 closes the go pipe or the
    reset kills it. Never returns."""
    status = 125
    try:
        try:
            apply_task_limits(None, fsize_limit, nofile_limit, nproc_limit)
            os.set_inheritable(GO_FD, False)  # the go pipe stays open for the next calls, but not in subprocesses
            main = execute.task_main()
            execute._KEEP.append(sys.stdin)  # each call gets a stdin of its own on fd 0; this one must not close it
            signal.signal(signal.SIGINT, interrupt_call)
            figures = taskfiles.Figures()
            figures.install()
            os.write(STATUS_FD, STATUS_READY)
        except BaseException as exc:
            os.write(2, f"sandbox setup failed: {exc!r}".encode())
            os._exit(status)
        status = 0
        while True:
            # EOF: the session ended. The call's files follow the message on the go pipe.
            nonce, code, compiled, stdin, filename, outputs, files_limit, files = go_pipe.receive(GO_FD)
            call_stdin(stdin)
            del stdin
            try:
                taskfiles.write_files(WORK_DIR, files, lambda size: go_pipe.read_exactly(GO_FD, size), replace=True)
            except taskfiles.FileError as exc:  # the code does not run; the session goes on
                os.write(2, str(exc).encode("utf-8", "backslashreplace"))
                exit_code, flags = 1, 0
            else:
                exit_code, flags = session_call(main, code, compiled, filename)
                # As a notebook does: what a call showed or left open is its own, closed once sent.
                figures.capture_open(close=True)
            taskfiles.send_outputs(FILES_FD, WORK_DIR, outputs, files_limit, figures)
            os.write(STATUS_FD, CALL_DONE + nonce + bytes((exit_code & 0xFF, flags)))
    except BaseException:
        status = status or 1
    finally:
        os._exit(status)


def interrupt_call(signum: int, frame: types.FrameType | None) -> None:
    """SIGINT from PID 1 at a call's deadline: stop the call with a KeyboardInterrupt, and keep the
    interpreter. Between calls it is dropped, so that a late one cannot end the session."""
    if _in_call[0]:
        raise KeyboardInterrupt


def call_stdin(data: bytes) -> None:
    """This call's stdin on fd 0 (a fresh memfd), and `sys.stdin` reading it."""
    fd = os.memfd_create("stdin")
    try:
        write_all(fd, data)
    except OSError as exc:  # larger than the session's file size limit
        os.ftruncate(fd, 0)
        os.write(2, f"warmpool: this call's stdin was dropped: {exc.strerror}\n".encode())
    os.lseek(fd, 0, os.SEEK_SET)
    os.dup2(fd, 0)
    os.close(fd)
    stream = open(0, encoding="utf-8", errors="surrogateescape", closefd=False)
    for name in ("stdin", "__stdin__"):
        setattr(sys, name, stream)


def session_call(main: types.ModuleType, code: str, compiled: types.CodeType | None,
                 filename: str) -> tuple[int, int]:
    """Run one call in the session's `__main__`; (exit status, flags), as a task's would be."""
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    status, flags = 0, 0
    try:
        _in_call[0] = True
        try:
            exec(compiled if compiled is not None else compile(code, filename, "exec"), main.__dict__)
        finally:
            _in_call[0] = False
    except SystemExit as exc:  # as in a notebook: the call ends with that status, the session goes on
        status = execute.exit_status(exc.code)
    except BaseException as exc:
        status, flags = 1, CALL_MEMORY_ERROR if isinstance(exc, MemoryError) else 0
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:  # not our SIGINT handler's frame in the traceback
            if tb.tb_next.tb_frame.f_code is interrupt_call.__code__:
                tb.tb_next = None
            tb = tb.tb_next
        execute.report(exc)
    return execute.flush_streams(status), flags
