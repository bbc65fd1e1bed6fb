"""Tasks and outcomes to and from what Redis holds: stream entry fields (str to str) and JSON (no I/O).

An outcome is what a worker reports for one task: either the execution (whatever the code did) or the
pool error that kept it from running, plus who handled it and the wall-clock times. It travels as JSON in
the task's hash (async tasks) and on the submitting API's reply list (synchronous ones).
"""

from __future__ import annotations

import binascii
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pool.model.errors import (
    BackendUnavailable,
    NoCapacity,
    Overloaded,
    PoolError,
    SandboxError,
    SessionBusy,
    SessionGone,
    TooManySessions,
)
from pool.model.resources import Resources
from pool.model.results import (
    DEFAULT_OUTPUT_FILES_BYTES,
    InputFile,
    Status,
    TaskResult,
    TaskSpec,
    Usage,
    input_files,
    output_files,
)
from pool.model.tasks import Execution
from pool.model.tiers import Tier

# Most specific first: Overloaded is a NoCapacity (429 rather than 503), TooManySessions an Overloaded.
_ERROR_KINDS: dict[str, type[PoolError]] = {
    "too_many_sessions": TooManySessions, "overloaded": Overloaded, "no_capacity": NoCapacity,
    "backend_unavailable": BackendUnavailable, "session_gone": SessionGone, "session_busy": SessionBusy,
    "sandbox_error": SandboxError}


class MalformedEntry(ValueError):
    """A stream entry or outcome that is not one of ours (or from an incompatible version)."""


@dataclass(frozen=True)
class StreamEntry:
    """A task as it travels on its tier's stream: what a worker needs to run it and to answer it.

    Written by the API (`to_fields`) and read by the worker (`from_fields`), here only; a field that is
    missing or does not parse is a MalformedEntry naming it (the worker drops such an entry)."""

    spec: TaskSpec
    reply_to: str  # the submitting API's reply list; "" for an async task (its outcome stays in its hash)
    submitted_unix: float  # the API's clock at submission
    result_ttl_ms: int  # how long the outcome of an async task is kept (the API's setting)
    lease_wait_s: float  # the request's wait for a container (its max_wait_ms, within the lease timeout)
    max_result_bytes: int = 0  # an async task's bound on a stored result (the API's setting); 0: none
    stream: bool = False  # relay the task's output through Redis as it comes (pool/scaleout/output_relay.py)
    session: SessionOpen | None = None  # not a task: open this session (pool/scaleout/session_worker.py)

    def to_fields(self) -> dict[str, str]:
        spec = self.spec
        fields = {"id": spec.task_id, "code": spec.code, "stdin": spec.stdin, "timeout_s": repr(spec.timeout_s),
                  "output_limit_bytes": str(spec.output_limit_bytes), "reply_to": self.reply_to,
                  "submitted_unix": repr(self.submitted_unix), "result_ttl_ms": str(self.result_ttl_ms),
                  "lease_wait_s": repr(self.lease_wait_s), "max_result_bytes": str(self.max_result_bytes),
                  "max_output_files_bytes": str(spec.max_output_files_bytes)}
        for name, value in spec.files_fields().items():  # files and outputs as JSON: stream fields are text
            if name in ("files", "outputs"):
                fields[name] = json.dumps(value)
        if self.stream:
            fields["stream"] = "1"
        if self.session is not None:
            fields.update(session="open", owner=self.session.owner, image=self.session.image,
                          idle_timeout_s=repr(self.session.idle_timeout_s))
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> StreamEntry:
        task_id = _text(fields, "id")
        if not task_id:
            raise MalformedEntry("bad task entry: 'id' is empty")
        spec = TaskSpec(task_id=task_id, code=_text(fields, "code"), stdin=fields.get("stdin", ""),
                        timeout_s=_number(fields, "timeout_s", positive=True),
                        output_limit_bytes=int(_number(fields, "output_limit_bytes", positive=True, whole=True)),
                        files=_files(fields), outputs=_outputs(fields),
                        max_output_files_bytes=int(_number(fields, "max_output_files_bytes", whole=True))
                        if "max_output_files_bytes" in fields else DEFAULT_OUTPUT_FILES_BYTES)
        session = None if fields.get("session") != "open" else SessionOpen(
            owner=_text(fields, "owner"), image=_text(fields, "image"),
            idle_timeout_s=_number(fields, "idle_timeout_s", positive=True))
        return cls(spec=spec, reply_to=fields.get("reply_to", ""),
                   submitted_unix=_number(fields, "submitted_unix"),
                   result_ttl_ms=int(_number(fields, "result_ttl_ms", positive=True, whole=True)),
                   lease_wait_s=_number(fields, "lease_wait_s"),
                   max_result_bytes=int(_number(fields, "max_result_bytes", whole=True)),
                   stream=fields.get("stream") == "1", session=session)


@dataclass(frozen=True)
class SessionOpen:
    """A stream entry that opens a session rather than running a task: whose, on which image, how long idle."""

    owner: str
    image: str
    idle_timeout_s: float


def _files(fields: Mapping[str, str]) -> tuple[InputFile, ...]:
    try:
        return input_files(json.loads(fields.get("files", "[]")))
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise MalformedEntry(f"bad task entry: files: {exc!r}") from None


def _outputs(fields: Mapping[str, str]) -> tuple[str, ...]:
    try:
        patterns = json.loads(fields.get("outputs", "[]"))
    except ValueError as exc:
        raise MalformedEntry(f"bad task entry: outputs: {exc!r}") from None
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise MalformedEntry("bad task entry: outputs must be a list of strings")
    return tuple(patterns)


def _text(fields: Mapping[str, str], name: str) -> str:
    try:
        return str(fields[name])
    except KeyError:
        raise MalformedEntry(f"bad task entry: no {name!r}") from None


def _number(fields: Mapping[str, str], name: str, *, positive: bool = False, whole: bool = False) -> float:
    """A finite number at least 0 (above 0 when `positive`; an integer when `whole`), or MalformedEntry."""
    raw = _text(fields, name)
    try:
        value = float(raw)
    except ValueError:
        raise MalformedEntry(f"bad task entry: {name}={raw!r} is not a number") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0) or (whole and value != int(value)):
        kind = "a whole number" if whole else "a finite number"
        raise MalformedEntry(f"bad task entry: {name}={raw!r} is not {kind} {'above' if positive else 'at least'} 0")
    return value


@dataclass(frozen=True)
class Outcome:
    """How one task ended, as a worker saw it."""

    task_id: str
    worker: str
    tier: Tier
    execution: Execution | None = None
    error: PoolError | None = None
    queue_ms: float = 0.0  # submission to start (wall clocks of two hosts: assumes they are in sync)
    total_ms: float = 0.0  # submission to result

    def to_json(self) -> str:
        body: dict[str, Any] = {"id": self.task_id, "worker": self.worker, "tier": tier_dict(self.tier),
                                "queue_ms": self.queue_ms, "total_ms": self.total_ms}
        if self.execution is not None:
            result = asdict(self.execution.result)
            result["status"] = self.execution.result.status.value
            body["result"] = result
            body["container"] = self.execution.container_name
            body["ran_on"] = self.execution.worker  # differs from `worker` for a lost worker's task
        if self.error is not None:
            body["error"] = error_json(self.error)
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> Outcome:
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise MalformedEntry(f"bad outcome: {exc!r}") from exc
        return cls.from_body(body)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Outcome:
        try:
            tier = tier_from(body["tier"])
            execution: Execution | None = None
            error: PoolError | None = None
            if "result" in body:
                result = dict(body["result"])
                result["status"] = Status(result["status"])
                result["usage"] = Usage(**result.get("usage") or {})
                result["files"] = output_files(result.get("files") or ())
                execution = Execution(result=TaskResult(**result), tier=tier, queue_ms=float(body["queue_ms"]),
                                      container_name=str(body.get("container", "")),
                                      worker=str(body.get("ran_on", body["worker"])))
            if "error" in body:
                error = error_from(body["error"])
            return cls(task_id=str(body["id"]), worker=str(body["worker"]), tier=tier, execution=execution,
                       error=error, queue_ms=float(body["queue_ms"]), total_ms=float(body["total_ms"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedEntry(f"bad outcome: {exc!r}") from exc

    def raise_or_execution(self) -> Execution:
        """The execution, or the error that kept the task from running, raised."""
        if self.execution is not None:
            return self.execution
        raise self.error or SandboxError("the worker reported neither a result nor an error")


NOT_RERUN = "the task was not run again because it may have had effects (resubmit it if it is safe to repeat)"


def _not_rerun(task_id: str, worker: str, tier: Tier, ran_on: str, why: str, queue_ms: float,
               total_ms: float) -> Outcome:
    """A started task answered `sandbox_error` without its result: at-most-once, it is never run twice."""
    result = TaskResult.sandbox_error(task_id, f"{why}; {NOT_RERUN}")
    execution = Execution(result=result, tier=tier, queue_ms=queue_ms, container_name="", worker=ran_on)
    return Outcome(task_id=task_id, worker=worker, tier=tier, execution=execution, queue_ms=queue_ms,
                   total_ms=total_ms)


def worker_lost(task_id: str, worker: str, tier: Tier, dead_worker: str, queue_ms: float,
                total_ms: float) -> Outcome:
    """The verdict for a task whose worker died after starting it: it is answered, never run twice."""
    return _not_rerun(task_id, worker, tier, dead_worker,
                      f"worker lost: worker {dead_worker!r} stopped while running this task", queue_ms, total_ms)


def worker_stopped(task_id: str, worker: str, tier: Tier, queue_ms: float, total_ms: float) -> Outcome:
    """The verdict for a task still running when its worker's grace period ended: stopped, never rerun."""
    return _not_rerun(task_id, worker, tier, worker, f"worker stopped: worker {worker!r} was stopped and its "
                      "grace period ended while this task ran", queue_ms, total_ms)


def error_json(error: PoolError) -> dict[str, Any]:
    kind = next((k for k, cls in _ERROR_KINDS.items() if isinstance(error, cls)), "sandbox_error")
    body = {"kind": kind, "message": str(error), "retry_after_s": getattr(error, "retry_after_s", 1.0)}
    if isinstance(error, SessionGone):
        body.update(session_id=error.session_id, reason=error.reason)
    return body


def error_from(raw: dict[str, Any]) -> PoolError:
    message, retry_after_s = str(raw["message"]), float(raw.get("retry_after_s", 1.0))
    if raw["kind"] == "too_many_sessions":
        return TooManySessions(message, retry_after_s=retry_after_s)
    if raw["kind"] == "session_gone":
        return SessionGone(str(raw.get("session_id", "")), raw.get("reason"))
    if raw["kind"] == "session_busy":
        return SessionBusy(message)
    if raw["kind"] == "overloaded":
        return Overloaded(message, retry_after_s=retry_after_s)
    if raw["kind"] == "no_capacity":
        return NoCapacity(message, retry_after_s=retry_after_s)
    if raw["kind"] == "backend_unavailable":
        return BackendUnavailable(message, retry_after_s=retry_after_s)
    return SandboxError(message)


def tier_dict(tier: Tier) -> dict[str, Any]:
    return {"name": tier.name, **tier.resources.as_dict(), "runtime": tier.runtime, "image": tier.image}


def tier_from(raw: dict[str, Any]) -> Tier:
    return Tier(name=str(raw["name"]), runtime=str(raw.get("runtime", "runc")), image=str(raw.get("image", "python")),
                resources=Resources(cpu=float(raw["cpu"]), gpu=int(raw["gpu"]), ram_bytes=int(raw["ram_bytes"]),
                                    storage_bytes=int(raw["storage_bytes"])))
