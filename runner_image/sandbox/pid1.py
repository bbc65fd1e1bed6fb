"""PID 1: start-up (the task environment, the image's preloaded modules, the template forked before the
first frame is read) and the frame loop.

One request at a time: the loop is single-threaded and blocking on purpose, so there is no state to race
on. PID 1 holds every task's data (request, code, stdin, output, status), so it never forks a task: the
reuse rule (PROTOCOL.md) is that no process that ever held a task's data is forked into, or becomes, a
later task. Never run this on a host: the reset is kill(-1, SIGKILL), so it refuses to start unless it
is PID 1."""

import gc
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any, BinaryIO

from runner_image.sandbox import sessions, template, zygote
from runner_image.sandbox.config import (
    CACHE_LINKS,
    IMAGE_ENV,
    MPL_BUILT_CACHE,
    PYTHON_VERSION,
    READ_CHUNK,
    TASK_DIRS,
    TASK_ENV,
)
from runner_image.sandbox.frames import ProtocolError, open_channel, read_frame, send
from runner_image.sandbox.limits import make_task_dirs
from runner_image.sandbox.requests import parse_task
from runner_image.sandbox.reset import verify_clean
from runner_image.sandbox.scratch import remove_start_up_leftovers
from runner_image.sandbox.tasks import handle_run


def main() -> None:
    if os.getpid() != 1:
        sys.exit("warmpool runner: refusing to start: not PID 1 (its reset kills every process it can)")
    # Move the frame channel off fds 0/1 so that nothing printed by accident can corrupt it.
    frame_in, frame_out = os.dup(0), os.dup(1)
    open_channel(frame_out)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.close(null)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1 ignores SIGTERM unless it asks for it
    modules = os.environ.get("WARMPOOL_PRELOAD", "")  # set by the image, not by the host
    kept = image_environment(os.environ)
    os.environ.clear()  # the tasks' environment, set once here so that forks inherit it for free
    os.environ.update(TASK_ENV, **kept)
    preload(modules)
    gc.collect()
    gc.freeze()  # keep the collector off the pages shared with the children, so forks stay cheap
    template.start()  # before the first frame is read: it must never have seen one
    reader = open(frame_in, "rb", buffering=READ_CHUNK)
    serve(reader)


def serve(reader: BinaryIO) -> None:
    while True:
        msg_id = None
        try:
            msg = read_frame(reader)
            if msg is None:
                return
            msg_id = msg.get("id") if isinstance(msg.get("id"), str) else None
            dispatch(msg, msg_id)
        except ProtocolError as exc:
            send({"op": "error", "id": msg_id, "detail": str(exc)})
        except Exception as exc:  # the loop must survive anything
            send({"op": "error", "id": msg_id, "detail": f"runner error: {exc!r}"})


def dispatch(msg: dict[str, Any], msg_id: str | None) -> None:
    op = msg.get("op")
    if msg_id is None:
        raise ProtocolError("missing or non-string id")
    if op == "ping":
        clean, detail = verify_clean()
        send({"op": "pong", "id": msg_id, "clean": clean, "detail": detail, "python": PYTHON_VERSION})
        if clean:
            zygote.ensure()
    elif op == "run":
        if sessions.is_open():
            raise ProtocolError("run: a session is open in this container; close it first")
        handle_run(parse_task(msg, msg_id))
    elif isinstance(op, str) and op in sessions.SESSION_OPS:
        sessions.SESSION_OPS[op](msg, msg_id)
    else:
        raise ProtocolError(f"unknown op {ascii(op)[:100]}")


def preload(modules: str) -> None:
    """Import the image's heavy modules once, before the template forks, so that a task's import of them
    is a dictionary lookup. Every task still starts from this same state: each is a fresh fork.

    The task dirs exist while they import (matplotlib makes and remembers its MPLCONFIGDIR, and reads the
    built font list from there rather than scanning the fonts again); then whatever the imports left in
    the scratch dirs goes, before the template forks and the first clean check."""
    make_task_dirs()
    try:
        for name in filter(None, (part.strip() for part in modules.split(","))):
            try:
                __import__(name)
            except Exception as exc:  # a broken optional module must not take the container down
                print(f"warmpool runner: could not preload {name}: {exc!r}", file=sys.stderr)
    finally:
        remove_start_up_leftovers()


def image_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The image's settings for its libraries that tasks keep (IMAGE_ENV), where the image has matplotlib
    (its font list was built): a matplotlib config dir on /tmp is then made for each task, with the font
    list linked into it. An image without matplotlib keeps the minimal environment."""
    built = sorted(os.listdir(MPL_BUILT_CACHE)) if os.path.isdir(MPL_BUILT_CACHE) else []
    if not built:
        return {}
    kept = {name: env[name] for name in IMAGE_ENV if env.get(name)}
    config_dir = kept.get("MPLCONFIGDIR", "")
    if os.path.dirname(config_dir) == "/tmp":  # one level below /tmp: the reset removes it with the rest
        TASK_DIRS.append(config_dir)
        CACHE_LINKS.extend((os.path.join(MPL_BUILT_CACHE, name), os.path.join(config_dir, name)) for name in built)
    return kept
