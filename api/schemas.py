"""Pydantic models at the HTTP edge: what clients send and what they get back."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from pool.model.errors import InvalidRequest
from pool.model.resources import ResourceRequest, parse_bytes, parse_count, parse_number

_NUMBER = {"type": "number", "exclusiveMinimum": 0}
_BYTES = {"type": "integer", "exclusiveMinimum": 0}
_NUMERIC_STRING = {"type": "string", "description": "a number written as a string, e.g. \"2\""}
_SIZE_STRING = {"type": "string", "description": "a byte count, or a number with K/M/G/T (KB/MB/GB/TB, "
                "KiB/MiB/GiB/TiB: all powers of 1024)"}


def _schema(*choices: dict[str, Any]) -> WithJsonSchema:
    """The field's schema in the document: one of `choices`, or null (absent)."""
    return WithJsonSchema({"anyOf": [*choices, {"type": "null"}]})


class ResourcesIn(BaseModel):
    """What the task needs; every field is optional. Sizes read like Docker's flags (powers of 1024)."""

    model_config = ConfigDict(extra="forbid")

    # The fields take what the seed sends (numeric strings, sizes with units) and are checked by the validators
    # below, which name the field; the document says what they take: a number, or a string of one.
    cpu: Annotated[Any, _schema(_NUMBER, _NUMERIC_STRING)] = Field(
        default=None, description="CPUs: a number or numeric string, e.g. 0.5 or \"2\"", examples=[2, "0.5"])
    gpu: Annotated[Any, _schema({"type": "integer", "minimum": 0}, _NUMERIC_STRING)] = Field(
        default=None, description="Whole GPUs; 0 when absent", examples=[0, "1"])
    ram: Annotated[Any, _schema(_BYTES, _SIZE_STRING)] = Field(
        default=None, description="Memory: bytes or a size such as \"512MB\" or \"1GiB\"",
        examples=[536870912, "512MB", "1GiB"])
    storage: Annotated[Any, _schema(_BYTES, _SIZE_STRING)] = Field(
        default=None, description="Scratch space: bytes or a size such as \"1GB\"", examples=[1073741824, "1GB"])

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, value: Any) -> float | None:
        return None if value is None else _as_value_error(lambda: parse_number("cpu", value, allow_zero=False))

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, value: Any) -> int:
        return 0 if value is None else _as_value_error(lambda: parse_count("gpu", value))

    @field_validator("ram", "storage")
    @classmethod
    def _size(cls, value: Any) -> int | None:
        return None if value is None else _as_value_error(lambda: parse_bytes("size", value))

    def to_request(self) -> ResourceRequest:
        return ResourceRequest(cpu=self.cpu, gpu=self.gpu or 0, ram_bytes=self.ram, storage_bytes=self.storage)


def _as_value_error(parse: Any) -> Any:
    """Our parsers name the field themselves; pydantic adds the location, so keep only the message."""
    try:
        return parse()
    except InvalidRequest as exc:
        raise ValueError(exc.message) from None


class FileIn(BaseModel):
    """A file written under the task's working directory before its code runs, owned by the sandbox user."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Relative to the working directory, e.g. \"data/in.csv\"; directories are made")
    content: str = Field(default="", description="The file's bytes: text, or base64 with encoding \"base64\"")
    encoding: Literal["utf-8", "base64"] = "utf-8"


class ExecuteRequest(BaseModel):
    """A snippet to run and the resources it needs."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"task_type": "execute_code", "code": "print('Hello, World!')",
         "resources": {"cpu": "2", "gpu": "0", "ram": "512MB", "storage": "1GB"}},
        {"code": "import sys\nprint(sys.stdin.read())", "stdin": "ada", "resources": {"cpu": 0.5, "ram": 134217728},
         "timeout_s": 5}]})

    task_type: Literal["execute_code"] = Field(default="execute_code", description="Only 'execute_code' for now")
    code: str = Field(min_length=1, description="Python source, run as __main__")
    resources: ResourcesIn | None = None
    timeout_s: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                    description="Wall-clock limit; the server sets the default and the cap")
    stdin: str = Field(default="", description="Text given to the task on standard input")
    image: str = Field(default="python", description="The sandbox image (GET /v1/images): \"python\" (the "
                       "standard library) or \"datascience\" (numpy, pandas, scipy, matplotlib, pillow)")
    files: list[FileIn] = Field(default_factory=list, description="Written under the working directory first")
    outputs: list[str] = Field(default_factory=list, description="Globs relative to the working directory "
                               "(\"*.png\", \"out/**/*.csv\"): the regular files they match when the code ends "
                               "come back in `files`")
    max_wait_ms: float | None = Field(
        default=None, ge=0, allow_inf_nan=False,
        description="Longest wait for a container of the tier (capped by the server's lease timeout); when none "
                    "can be had in time the answer is 503 with Retry-After from the tier's observed waits")


class TaskRequest(ExecuteRequest):
    """An async task: a snippet as /v1/execute takes it, and optionally where to POST its result."""

    callback_url: str | None = Field(
        default=None, max_length=2048,
        description="When the task ends, its result body is POSTed here, signed in X-Warmpool-Signature "
                    "(sha256=<hex HMAC-SHA256 of the body>); only hosts the server allows (WARMPOOL_CALLBACK_ALLOW)")


class BatchRequest(BaseModel):
    """Several async tasks in one request: all are queued, or none (one invalid task makes it a 422)."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[TaskRequest] = Field(min_length=1, description="At most the server's WARMPOOL_MAX_BATCH (100)")


class ResourcesOut(BaseModel):
    cpu: float
    gpu: int
    ram_bytes: int
    storage_bytes: int


class Timings(BaseModel):
    queue_ms: float = Field(description="Waiting for a warm container")
    run_ms: float = Field(description="The task itself, as the runner measured it")
    total_ms: float = Field(description="From request parsed to response ready")


class UsageOut(BaseModel):
    cpu_s: float
    max_rss_bytes: int


class FileOut(BaseModel):
    path: str = Field(description="Relative to the working directory; figures are figures/figure-<n>.png")
    size_bytes: int
    encoding: Literal["base64"]
    content: str | None = Field(description="Base64; null past the server's output files cap")


class ExecuteResponse(BaseModel):
    id: str
    status: Literal["succeeded", "failed", "timed_out", "memory_exceeded", "output_limit_exceeded",
                    "sandbox_error"]
    exit_code: int | None
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    tier: str
    image: str
    resources: ResourcesOut
    timings: Timings
    usage: UsageOut
    message: str = Field(default="", description="For sandbox_error: what broke")
    worker: str = Field(default="", description="The pool instance (a worker's id in scale-out mode) that ran it")
    files: list[FileOut] = Field(description="The files `outputs` matched, then the figures left open or shown")
    files_truncated: bool = Field(description="Some file's content is null, or files were left out: over the cap")


class TaskAccepted(BaseModel):
    id: str
    status: Literal["queued"]
    link: str = Field(description="Where to poll: GET it for the state, then the result")


class BatchAccepted(BaseModel):
    tasks: list[TaskAccepted] = Field(description="One per task, in the order they were sent")


class TaskPending(BaseModel):
    id: str
    status: Literal["queued", "running"]


class ImageOut(BaseModel):
    name: str
    docker_image: str
    python_version: str
    packages: dict[str, str] = Field(description="Every Python distribution in the image, with its version")
    preloaded: list[str] = Field(description="Modules already imported in the warm interpreter")
    description: str = ""


class TierOut(BaseModel):
    name: str
    image: str
    cpu: float
    gpu: int
    ram_bytes: int
    storage_bytes: int
    runtime: str
    min_idle: int
    max_size: int
    idle: int
    busy: int
    starting: int
    workers: int | None = Field(default=None, description="Scale-out mode: live workers serving the tier")
    queued: int | None = Field(default=None, description="Scale-out mode: tasks waiting or running")


class ReadyOut(BaseModel):
    ready: bool
    checks: dict[str, bool] = Field(description="Each check by name: docker, image, pools_warm (scale-out: "
                                    "redis, workers)", examples=[{"docker": True, "image": True, "pools_warm": True}])
