"""PID 1's handle on the template process: it forks the template (at start, before the first frame is
read) and sends it commands over a control socket. The handle lives in PID 1 only (`start`, `get`)."""

import os
import socket
from collections.abc import Sequence

from runner_image.sandbox.procs import has_exited
from runner_image.sandbox.template_process import template_main

TEMPLATE_WAIT_S = 10.0  # how long PID 1 waits for the template's answer before it calls the container dirty


class Template:
    """The template's control socket and pid.

    Commands are one word with, for `spawn`, the child's pipe ends passed as file descriptors; the
    answer is `ok <pid>` or `error <detail>`. Nothing else ever crosses the socket: the template never
    holds a task's data, so what it forks starts as clean as the container did."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Our own control socket shows in /proc/net/unix: the network check must not count it.
        self.inodes = {os.fstat(ours.fileno()).st_ino, os.fstat(theirs.fileno()).st_ino}
        self.pid = os.fork()
        if self.pid == 0:
            ours.close()
            template_main(theirs)  # never returns
        theirs.close()
        self.sock = ours
        self.sock.settimeout(TEMPLATE_WAIT_S)

    def call(self, command: bytes, fds: Sequence[int] = ()) -> int:
        """Send a command and wait for the number in its `ok` answer; RuntimeError otherwise."""
        self.request(command, fds)
        return self.answer(command)

    def request(self, command: bytes, fds: Sequence[int] = ()) -> None:
        try:
            socket.send_fds(self.sock, [command], list(fds))
        except OSError as exc:
            raise RuntimeError(f"the template did not take {command.decode()!r}: {exc!r}") from None

    def answer(self, command: bytes) -> int:
        try:
            answer = self.sock.recv(256)
        except OSError as exc:
            raise RuntimeError(f"the template did not answer {command.decode()!r}: {exc!r}") from None
        word, _, rest = answer.decode("ascii", "replace").partition(" ")
        if word != "ok":
            raise RuntimeError(f"the template failed {command.decode()!r}: {rest or 'it is gone'}")
        return int(rest)

    def alive(self) -> bool:
        return not has_exited(self.pid)


_template: Template | None = None  # in PID 1, once started


def start() -> Template:
    """Fork the template. PID 1 calls this once, before it reads the first frame: it must never have seen one."""
    global _template
    _template = Template()
    return _template


def get() -> Template:
    """PID 1's template (RuntimeError before start-up forked it)."""
    if _template is None:
        raise RuntimeError("the template has not been started")
    return _template
