"""A task's child (forked by the template, ahead of time): enter the sandbox, wait on the go pipe for the
task PID 1 sends, write the request's files, run the code, send back the outputs and figures, say DONE,
_exit. It runs one task (or becomes one session's interpreter) and never anything else."""

import fcntl
import os
import resource
import signal
import sys
import traceback
from typing import NoReturn

from runner_image.sandbox import go_pipe, taskfiles
from runner_image.sandbox.config import DONE, FILES_FD, GO_FD, STATUS_DONE, STATUS_FD, STATUS_READY, WORK_DIR
from runner_image.sandbox.execute import run_code
from runner_image.sandbox.fdio import write_all
from runner_image.sandbox.limits import apply_task_limits, enter_sandbox
from runner_image.sandbox.session_child import session_child


def task_child(go_r: int, out_w: int, err_w: int, status_w: int, files_w: int) -> NoReturn:
    """Body of a task's child. Never returns."""
    status = 125
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        # Lift every source above the targets first: a source may sit on a target's number.
        sources = [fcntl.fcntl(fd, fcntl.F_DUPFD, 64) for fd in (null, out_w, err_w, go_r, status_w, files_w)]
        for dst, src in enumerate(sources):
            os.dup2(src, dst)
        for fd in (STATUS_FD, FILES_FD):
            os.set_inheritable(fd, False)  # not into the task's own subprocesses
        os.closerange(FILES_FD + 1, os.sysconf("SC_OPEN_MAX"))  # the template's control socket above all
        enter_sandbox()
        reseed()
        message = go_pipe.receive(GO_FD)
        if message[0] is None:  # not a task: a session's interpreter, which serves calls until PID 1 ends it
            session_child(*message[1:])  # never returns
        (code, compiled, stdin, timeout_s, fsize_limit, nofile_limit, nproc_limit, outputs, files_limit,
         files) = message
        figures = taskfiles.Figures()
        figures.install()
        stdin_fd = os.memfd_create("stdin")  # before the limits: stdin may be larger than RLIMIT_FSIZE
        write_all(stdin_fd, stdin)
        os.lseek(stdin_fd, 0, os.SEEK_SET)
        os.dup2(stdin_fd, 0)
        os.close(stdin_fd)
        del stdin
        apply_task_limits(timeout_s, fsize_limit, nofile_limit, nproc_limit)
        os.write(STATUS_FD, STATUS_READY)  # from here on, what goes wrong is the task's (its files, its code)
    except BaseException as exc:  # never run the code half-sandboxed
        try:
            os.write(2, f"sandbox setup failed: {exc!r}".encode())
        finally:
            os._exit(status)
    try:
        taskfiles.write_files(WORK_DIR, files, lambda size: go_pipe.read_exactly(GO_FD, size))
        os.close(GO_FD)
        me = os.getpid()  # a fork the task made may return here too: only this process sends outputs

        def at_end() -> None:
            if os.getpid() == me:
                figures.capture_open()
        status = run_code(code, compiled, at_end)
        if os.getpid() == me:
            taskfiles.send_outputs(FILES_FD, WORK_DIR, outputs, files_limit, figures)
            say_done(status)
    except taskfiles.FileError as exc:
        os.write(2, str(exc).encode("utf-8", "backslashreplace"))
        status = 1
    except BaseException:  # a runner bug, not the task's: say so where the host will look
        os.write(2, f"warmpool: runner error in the task child:\n{traceback.format_exc()}".encode())
    finally:
        os._exit(status)


def reseed() -> None:
    """What a fresh interpreter has that a fork of the template would not: its own random seeds. `random`
    reseeds itself after a fork; numpy's global generator does not, and every task would draw the same
    numbers."""
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()


def say_done(status: int) -> None:
    """The DONE record: the code has ended and everything it gives back has been written."""
    own, waited = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_us = round((own.ru_utime + own.ru_stime + waited.ru_utime + waited.ru_stime) * 1e6)
    try:
        os.write(STATUS_FD, DONE.pack(STATUS_DONE, status, cpu_us, max(own.ru_maxrss, waited.ru_maxrss)))
    except OSError:
        pass  # the task closed it: PID 1 waits for the exit instead
