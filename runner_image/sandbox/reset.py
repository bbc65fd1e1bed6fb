"""The reset after every task and session (PID 1): kill every sandbox process, empty the scratch dirs,
then verify that it worked (`verify_clean`, also what `pong` reports) and say so in a `reset` frame."""

import os
import time

from runner_image.sandbox import network, sysv, template, zygote
from runner_image.sandbox.config import KILL_WAIT_S, SCRATCH_DIRS
from runner_image.sandbox.frames import send
from runner_image.sandbox.procs import reap_zombies
from runner_image.sandbox.scratch import remove_top_entries


def reset_and_report(msg_id: str, failure: str = "") -> None:
    """Reset the container and send `reset`; a runner failure before it makes it dirty whatever it found."""
    try:
        clean, detail = reset()
    except Exception as exc:
        clean, detail = False, f"reset failed: {exc!r}"
    if failure:
        clean, detail = False, "; ".join(filter(None, [failure, detail]))
    send({"op": "reset", "id": msg_id, "clean": clean, "detail": detail})
    if clean:
        zygote.ensure()  # after the reply: the host may lease the container while the child sets up


def reset() -> tuple[bool, str]:
    """Kill every sandbox process, empty the scratch dirs, then say whether that verifiably worked."""
    zygote.finish_exiting()
    zygote.discard()
    kill_sandbox()
    empty_scratch()
    return verify_clean()


def kill_sandbox() -> None:
    """End every process but PID 1 and the template; repeat until /proc agrees or the time is up.

    Only live processes can fork, so when /proc shows none after reaping, none can appear. Otherwise
    the template's killer, running as the sandbox uid, sends kill(-1): the kernel signals every
    process that uid may signal in one sweep (a forking loop cannot outrun it), and never root's."""
    deadline, pause = time.monotonic() + KILL_WAIT_S, 0.0005
    while True:
        reap_zombies()
        if not stray_pids() or time.monotonic() > deadline:
            return
        template.get().call(b"kill")
        reap_zombies()
        if not stray_pids():
            return
        time.sleep(pause)  # killed processes take a moment to exit (longer under gVisor): let them
        pause = min(pause * 2, 0.02)


def stray_pids() -> list[str]:
    """Every process but PID 1, the template and the waiting child (which has run nothing yet)."""
    allowed = {"1", str(template.get().pid), str(zygote.waiting_pid())}
    return [name for name in os.listdir("/proc") if name.isdigit() and name not in allowed]


def empty_scratch() -> None:
    """Remove what the task left: PID 1 the entries right in the scratch dirs, the template's cleaner (as
    the sandbox uid) whatever is deeper."""
    if remove_top_entries():
        template.get().call(b"clean")


def verify_clean() -> tuple[bool, str]:
    """(clean, detail): no process but PID 1 and a live template, every scratch dir empty, no SysV IPC
    object and no socket or connection state left in the network namespace."""
    reap_zombies()
    problems = []
    handle = template.get()
    if not handle.alive():
        problems.append("the template process is gone")
    if strays := stray_pids():
        problems.append(f"{len(strays)} process(es) still alive")
    for top in SCRATCH_DIRS:
        try:
            if left := len(os.listdir(top)):
                problems.append(f"{top} still holds {left} entries")
        except OSError as exc:
            problems.append(f"cannot list {top}: {exc.strerror}")
    problems += sysv.leftovers()
    if sockets := network.leftovers(handle.inodes):
        problems.append(f"network state left: {sockets}")
    elif not problems:
        network.mark_clean()
    return not problems, "; ".join(problems)
