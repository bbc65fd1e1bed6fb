"""Tasks and outcomes to and from what Redis holds: stream entry fields (str to str) and JSON (no I/O).

An outcome is what a worker reports for one task: either the execution (whatever the code did) or the
pool error that kept it from running, plus who handled it and the wall-clock times. It travels as JSON in
the task's hash (async tasks) and on the submitting API's reply list (synchronous ones).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import asdict, dataclass
from typing import Any

from pool.model.errors import BackendUnavailable, NoCapacity, Overloaded, PoolError, SandboxError
from pool.model.resources import Resources
from pool.model.results import DEFAULT_OUTPUT_FILES_BYTES, InputFile, Status, TaskResult, TaskSpec, Usage, output_files
from pool.model.tasks import Execution
from pool.model.tiers import Tier

# Most specific first: Overloaded is a NoCapacity (429 rather than 503).
_ERROR_KINDS: dict[str, type[PoolError]] = {
    "overloaded": Overloaded, "no_capacity": NoCapacity, "backend_unavailable": BackendUnavailable,
    "sandbox_error": SandboxError}


class MalformedEntry(ValueError):
    """A stream entry or outcome that is not one of ours (or from an incompatible version)."""


def spec_fields(spec: TaskSpec) -> dict[str, str]:
    fields = {"id": spec.task_id, "code": spec.code, "stdin": spec.stdin, "timeout_s": repr(spec.timeout_s),
              "output_limit_bytes": str(spec.output_limit_bytes),
              "max_output_files_bytes": str(spec.max_output_files_bytes)}
    if spec.files:
        fields["files"] = json.dumps([{"path": f.path, "content": base64.b64encode(f.content).decode("ascii")}
                                      for f in spec.files])
    if spec.outputs:
        fields["outputs"] = json.dumps(list(spec.outputs))
    return fields


def spec_from_fields(fields: dict[str, str]) -> TaskSpec:
    try:
        files = tuple(InputFile(path=str(f["path"]), content=base64.b64decode(f["content"], validate=True))
                      for f in json.loads(fields.get("files", "[]")))
        return TaskSpec(task_id=fields["id"], code=fields["code"], stdin=fields.get("stdin", ""),
                        timeout_s=float(fields["timeout_s"]), output_limit_bytes=int(fields["output_limit_bytes"]),
                        files=files, outputs=tuple(str(p) for p in json.loads(fields.get("outputs", "[]"))),
                        max_output_files_bytes=int(fields.get("max_output_files_bytes", DEFAULT_OUTPUT_FILES_BYTES)))
    except (KeyError, ValueError, TypeError, binascii.Error) as exc:
        raise MalformedEntry(f"bad task entry: {exc!r}") from exc


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
        body: dict[str, Any] = {"id": self.task_id, "worker": self.worker, "tier": _tier_dict(self.tier),
                                "queue_ms": self.queue_ms, "total_ms": self.total_ms}
        if self.execution is not None:
            result = asdict(self.execution.result)
            result["status"] = self.execution.result.status.value
            body["result"] = result
            body["container"] = self.execution.container_name
            body["ran_on"] = self.execution.worker  # differs from `worker` for a lost worker's task
        if self.error is not None:
            kind = next((k for k, cls in _ERROR_KINDS.items() if isinstance(self.error, cls)), "sandbox_error")
            body["error"] = {"kind": kind, "message": str(self.error),
                             "retry_after_s": getattr(self.error, "retry_after_s", 1.0)}
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> Outcome:
        try:
            body = json.loads(raw)
            tier = _tier_from(body["tier"])
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
                error = _error_from(body["error"])
            return cls(task_id=str(body["id"]), worker=str(body["worker"]), tier=tier, execution=execution,
                       error=error, queue_ms=float(body["queue_ms"]), total_ms=float(body["total_ms"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedEntry(f"bad outcome: {exc!r}") from exc

    def raise_or_execution(self) -> Execution:
        """The execution, or the error that kept the task from running, raised."""
        if self.execution is not None:
            return self.execution
        raise self.error or SandboxError("the worker reported neither a result nor an error")


def worker_lost(task_id: str, worker: str, tier: Tier, dead_worker: str, queue_ms: float,
                total_ms: float) -> Outcome:
    """The verdict for a task whose worker died after starting it: it is answered, never run twice."""
    result = TaskResult.sandbox_error(
        task_id, f"worker lost: worker {dead_worker!r} stopped while running this task; the task was not "
                 "run again because it may have had effects (resubmit it if it is safe to repeat)")
    execution = Execution(result=result, tier=tier, queue_ms=queue_ms, container_name="", worker=dead_worker)
    return Outcome(task_id=task_id, worker=worker, tier=tier, execution=execution, queue_ms=queue_ms,
                   total_ms=total_ms)


def _error_from(raw: dict[str, Any]) -> PoolError:
    message, retry_after_s = str(raw["message"]), float(raw.get("retry_after_s", 1.0))
    if raw["kind"] == "overloaded":
        return Overloaded(message, retry_after_s=retry_after_s)
    if raw["kind"] == "no_capacity":
        return NoCapacity(message, retry_after_s=retry_after_s)
    if raw["kind"] == "backend_unavailable":
        return BackendUnavailable(message, retry_after_s=retry_after_s)
    return SandboxError(message)


def _tier_dict(tier: Tier) -> dict[str, Any]:
    return {"name": tier.name, **tier.resources.as_dict(), "runtime": tier.runtime, "image": tier.image}


def _tier_from(raw: dict[str, Any]) -> Tier:
    return Tier(name=str(raw["name"]), runtime=str(raw.get("runtime", "runc")), image=str(raw.get("image", "python")),
                resources=Resources(cpu=float(raw["cpu"]), gpu=int(raw["gpu"]), ram_bytes=int(raw["ram_bytes"]),
                                    storage_bytes=int(raw["storage_bytes"])))
