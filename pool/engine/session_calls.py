"""A session on one container, in the runner's terms (runner_image/PROTOCOL.md, Sessions): open it, run
its calls, close it. The pool's side of leases, resets and endings is in pool/engine/sessions.py."""

from __future__ import annotations

import uuid

from pool.engine.channel import ChannelClosed
from pool.engine.container import ContainerHandle, OutputSink
from pool.engine.sandbox_spec import task_nproc_limit
from pool.model.errors import SandboxError
from pool.model.results import TaskResult, TaskSpec
from pool.model.sessions import INTERRUPT_GRACE_S, OPEN_TIMEOUT_S
from pool.model.tasks import RESULT_GRACE_S


async def open_session(handle: ContainerHandle, *, fsize_limit_bytes: int, nofile_limit: int) -> tuple[str, str]:
    """Start the session's interpreter: ("", frame id) once it is ready, or (why not, frame id) when it did
    not start (the runner then resets the container, answering that frame id). SandboxError when the
    container or its runner broke (it must be replaced)."""
    frame_id = uuid.uuid4().hex
    frame = {"op": "session_open", "id": frame_id, "fsize_limit_bytes": fsize_limit_bytes,
             "nofile_limit": nofile_limit, "nproc_limit": task_nproc_limit(handle.tier)}
    reply = await handle.request(frame, "session_opened", OPEN_TIMEOUT_S)
    if isinstance(reply, TaskResult):
        raise SandboxError(f"could not open a session on {handle.name}: {reply.message}")
    return ("" if reply.get("ok") else str(reply.get("detail") or "the runner refused")), frame_id


async def run_call(handle: ContainerHandle, spec: TaskSpec, on_output: OutputSink | None = None) -> TaskResult:
    """One call in the open session; a broken container gives a sandbox_error result (it must be replaced).
    The result's `session_ended` says when the call ended the session (the runner then resets)."""
    frame = {"op": "session_run", "id": spec.task_id, "code": spec.code, "stdin": spec.stdin,
             "timeout_s": spec.timeout_s, "output_limit_bytes": spec.output_limit_bytes,
             "stream": on_output is not None, **spec.files_fields()}
    reply = await handle.request(frame, "result", spec.timeout_s + INTERRUPT_GRACE_S + RESULT_GRACE_S, on_output)
    return reply if isinstance(reply, TaskResult) else handle.result_of(reply)


def close_session(handle: ContainerHandle) -> str:
    """Ask the runner to end the session and reset; returns the frame id its `reset` will answer.
    ChannelClosed when the container is gone."""
    if handle.channel is None:
        raise ChannelClosed("not connected")
    close_id = uuid.uuid4().hex
    handle.channel.send({"op": "session_close", "id": close_id})
    return close_id
