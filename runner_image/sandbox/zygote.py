"""The task children PID 1 keeps track of: the next one, waiting (asked of the template right after a
clean reset, and collected when a task or session needs it, so that PID 1 reads the next frame while the
template forks), and the last one, exiting (it said DONE before it exited: it is killed and waited for
after the answer has gone out). PID 1 only."""

import os
import time
from typing import NamedTuple

from runner_image.sandbox import template
from runner_image.sandbox.config import KILL_WAIT_S
from runner_image.sandbox.procs import has_exited, kill_task, reap_zombies


class Zygote(NamedTuple):
    """A waiting child and PID 1's ends of its pipes; `pid` is None while the template's answer is pending."""

    pid: int | None
    go_w: int
    out_r: int
    err_r: int
    status_r: int
    files_r: int

    def fds(self) -> tuple[int, ...]:
        return self.go_w, self.out_r, self.err_r, self.status_r, self.files_r


_zygote: Zygote | None = None
_exiting: int | None = None  # the pid of the last task's child when it said DONE before it exited


def request() -> Zygote:
    """Ask the template to fork the next task's child ahead of time; it enters the sandbox and blocks
    reading its code. The pipes are made here and their child ends handed over: PID 1 talks to the
    child directly, the template never sees a byte of a task."""
    (go_r, go_w), (out_r, out_w), (err_r, err_w), (status_r, status_w), (files_r, files_w) = \
        (os.pipe() for _ in range(5))
    try:
        template.get().request(b"spawn", (go_r, out_w, err_w, status_w, files_w))
    except BaseException:
        for fd in (go_w, out_r, err_r, status_r, files_r):
            os.close(fd)
        raise
    finally:
        for fd in (go_r, out_w, err_w, status_w, files_w):
            os.close(fd)
    return Zygote(None, go_w, out_r, err_r, status_r, files_r)


def ensure() -> None:
    """Called after a reply has gone out: a failure here must not send a frame of its own. The next task
    then asks again and reports the failure in its place (and the reset after it is not clean)."""
    global _zygote
    if _zygote is None:
        try:
            _zygote = request()
        except RuntimeError:
            pass


def take() -> Zygote | None:
    """The waiting child (collecting the template's answer if need be), or None; it is ours now."""
    global _zygote
    zygote, _zygote = _zygote, None
    if zygote is not None and zygote.pid is None:
        try:
            zygote = zygote._replace(pid=template.get().answer(b"spawn"))
        except BaseException:
            for fd in zygote.fds():
                os.close(fd)
            raise
    return zygote


def ready() -> tuple[int, Zygote]:
    """The waiting child, alive, for the next task or session (forked now if there is none), and its pid."""
    global _zygote
    reap_zombies()
    zygote = take()
    if zygote is not None and zygote.pid is not None and has_exited(zygote.pid):  # died while waiting
        close(zygote)
        reap_zombies()
        zygote = None
    if zygote is None:
        _zygote = request()
        zygote = take()
    if zygote is None or zygote.pid is None:
        raise RuntimeError("no task child")  # take() collected the answer: it has a pid or raised
    return zygote.pid, zygote


def discard() -> None:
    """Before a reset: kill the waiting child (it ran nothing) and close our ends of its pipes."""
    zygote = take()
    if zygote is not None:
        close(zygote)


def close(zygote: Zygote) -> None:
    if zygote.pid is not None:
        kill_task(zygote.pid)
    for fd in zygote.fds():
        os.close(fd)


def waiting_pid() -> int | None:
    """The waiting child's pid (collecting the template's answer if need be), or None."""
    global _zygote
    if _zygote is not None and _zygote.pid is None:
        _zygote = take()
    return _zygote.pid if _zygote is not None else None


def mark_exiting(pid: int) -> None:
    global _exiting
    _exiting = pid


def finish_exiting() -> None:
    """After the answer: kill the child that said it was done (it is exiting, or it forged the record)
    and wait, briefly, for it to go; the reset reaps it, and kills whatever else is left."""
    global _exiting
    pid, _exiting = _exiting, None
    if pid is None:
        return
    kill_task(pid)
    deadline, pause = time.monotonic() + KILL_WAIT_S, 0.0002
    while not has_exited(pid) and time.monotonic() < deadline:
        time.sleep(pause)
        pause = min(pause * 2, 0.005)
