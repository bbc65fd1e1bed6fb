"""The environment's side of the settings: every `WARMPOOL_*` variable the service reads, typed (pydantic-settings).

`read_env` turns a mapping (os.environ at start) into an `EnvSettings`, or raises `SettingsError` naming
every bad variable at once; fields left unset are None, so the defaults stay in one place
(`pool.settings.Settings`). Checks across variables are made on the assembled Settings (pool/settings.py).
`unknown_variables` finds the `WARMPOOL_*` names nobody reads, e.g. a mistyped one, for a warning at start.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from pool.model import cpu_quota
from pool.model.errors import InvalidRequest
from pool.model.resources import parse_bytes, parse_count, parse_number

PREFIX = "WARMPOOL_"


class SettingsError(InvalidRequest):
    """One or more settings are wrong; `problems` holds (variable, message) for each, `field` the first."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(*problems[0])
        self.problems = problems

    def __str__(self) -> str:
        return "; ".join(f"{name}: {message}" for name, message in self.problems)


def _parsed(parse: Callable[[Any], Any]) -> BeforeValidator:
    """Our parsers are total and say what is wrong; pydantic adds which variable, so keep their message."""
    def validate(value: Any) -> Any:
        try:
            return parse(value)
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None
    return BeforeValidator(validate)


def _items(value: Any) -> Any:
    return tuple(item.strip() for item in value.split(",") if item.strip()) if isinstance(value, str) else value


# The variables' types. A count is whole (WARMPOOL_MAX_BATCH=1.5 is an error, not 1); numbers are finite;
# sizes read like the requests' ("512MB", "1GiB", or bytes); lists are comma-separated.
Positive = Annotated[float, _parsed(lambda v: parse_number("", v, allow_zero=False))]
NonNegative = Annotated[float, _parsed(lambda v: parse_number("", v, allow_zero=True))]
Bytes = Annotated[int, _parsed(lambda v: parse_bytes("", v))]
Count = Annotated[int, _parsed(lambda v: parse_count("", v, minimum=1))]
CountOrZero = Annotated[int, _parsed(lambda v: parse_count("", v))]
Names = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_items)]
# The kernel's bounds of cpu.cfs_period_us, in microseconds.
CpuPeriod = Annotated[int, _parsed(lambda v: _cpu_period_us(v))]


def _cpu_period_us(value: Any) -> int:
    period_us = parse_count("", value, minimum=cpu_quota.MIN_PERIOD_US)
    if period_us > cpu_quota.MAX_PERIOD_US:
        raise InvalidRequest("", f"must be from {cpu_quota.MIN_PERIOD_US} to {cpu_quota.MAX_PERIOD_US} "
                             f"microseconds, got {period_us}")
    return period_us


class EnvSettings(BaseSettings):
    """What the environment sets; None: not set (the default applies). Field `max_batch` is
    `WARMPOOL_MAX_BATCH`."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, case_sensitive=False, env_ignore_empty=True,
                                      extra="ignore", frozen=True)

    tiers_file: str | None = None
    pool_sizes_file: str | None = None
    instance_id: str | None = None
    lease_timeout_s: Positive | None = None
    default_timeout_s: Positive | None = None
    max_timeout_s: Positive | None = None
    max_code_bytes: Bytes | None = None
    max_stdin_bytes: Bytes | None = None
    max_files_bytes: Bytes | None = None
    max_output_files_bytes: Bytes | None = None
    max_body_bytes: Bytes | None = None
    output_limit_bytes: Bytes | None = None
    start_concurrency: Count | None = None
    cpu_period_us: CpuPeriod | None = None
    reuse_cooldown_cpu_ms: NonNegative | None = None
    cpu_overcommit: Positive | None = None
    host_cpus: Positive | None = None
    host_ram: Bytes | None = None
    host_reserve_ram: Bytes | None = None
    host_reserve_cpus: NonNegative | None = None
    gpu_ids: Names | None = None
    warming: Literal["on", "off"] | None = None
    warm_window_s: Positive | None = None
    warm_quiet_s: Positive | None = None
    warm_burst_sigmas: NonNegative | None = None
    api_keys: Names | None = None
    admin_key: str | None = None
    rate_limit_per_s: NonNegative | None = None
    rate_limit_burst: CountOrZero | None = None
    max_waiting: CountOrZero | None = None
    max_header_bytes: Bytes | None = None
    request_read_timeout_s: Positive | None = None
    keep_alive_timeout_s: Positive | None = None
    max_connections: Count | None = None
    max_tasks_per_key: Count | None = None
    max_result_bytes_per_key: Bytes | None = None
    max_results: Count | None = None
    max_result_bytes: Bytes | None = None
    redis_url: str | None = None
    redis_prefix: str | None = None
    result_ttl_s: Positive | None = None
    max_queued: Count | None = None
    heartbeat_s: Positive | None = None
    visibility_timeout_s: Positive | None = None
    worker_grace_s: NonNegative | None = None
    worker_tiers: Names | None = None
    mode: Literal["warm", "cold"] | None = None
    scratch: Literal["disk", "memory"] | None = None
    scratch_dir: str | None = None
    max_batch: Count | None = None
    callback_allow: Names | None = None
    callback_secret: str | None = None
    callback_retry_s: Positive | None = None
    callback_attempt_timeout_s: Positive | None = None
    callback_concurrency: Count | None = None
    max_sessions_per_key: CountOrZero | None = None
    session_idle_timeout_s: Positive | None = None
    max_session_idle_s: Positive | None = None

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only what read_env hands over: no dotenv or secrets files, and os.environ only when read_env is
        # given it, so that tests can pass their own mapping.
        return (init_settings,)

    def set_values(self) -> dict[str, Any]:
        """The variables that were set, by field name."""
        return self.model_dump(exclude_none=True)


class _MappingSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping rather than os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        # What the source looks names up in (os.environ's, as its own loader would shape it: lower case, since
        # names are case-insensitive, and empty values dropped: an empty WARMPOOL_MODE= means unset).
        self.env_vars = {name.lower(): value for name, value in env.items() if value != ""}


def variable(field: str) -> str:
    return PREFIX + field.upper()


def read_env(env: Mapping[str, str]) -> EnvSettings:
    """The typed variables; SettingsError naming each bad one (with what was wrong) otherwise."""
    try:
        return EnvSettings(**_MappingSource(EnvSettings, env)())
    except ValidationError as exc:
        raise SettingsError([_problem(error) for error in exc.errors()]) from None


def _problem(error: Any) -> tuple[str, str]:
    name = variable(str(error["loc"][0])) if error["loc"] else PREFIX + "*"
    message = str(error["msg"]).removeprefix("Value error, ")
    if "got " in message:  # our parsers show the value themselves
        return name, message
    shown = repr(error.get("input"))
    return name, f"{message}, got {shown if len(shown) <= 60 else shown[:57] + '...'}"


# WARMPOOL_* names read by other parts of the project than the service's settings: not typos.
OTHER_READERS = {
    "WARMPOOL_URL": "the clients (warmpool run, warmpool mcp)",
    "WARMPOOL_API_KEY": "the clients (warmpool run, warmpool mcp)",
    "WARMPOOL_IMAGE": "the image catalogue (the python image's tag)",
    "WARMPOOL_BASE_IMAGE": "warmpool image",
    "WARMPOOL_CACHE_DIR": "warmpool image",
    "WARMPOOL_PRELOAD": "the runner, inside its image",
    "WARMPOOL_SERVICE_IMAGE": "make service-image and the swarm stack",
    "WARMPOOL_RUNNER_IMAGE": "the swarm stack", "WARMPOOL_TIERS": "the swarm stack",
    "WARMPOOL_PORT": "the swarm stack", "WARMPOOL_DOCKER_SOCKET": "the swarm stack",
    "WARMPOOL_MIX": "the benchmarks", "WARMPOOL_BENCH_RAM": "the benchmarks",
    "WARMPOOL_BENCH_IMAGE": "the benchmarks", "WARMPOOL_BENCH_CONNECTION": "the benchmarks",
    "WARMPOOL_REDIS_DIR": "scripts/ensure-redis.sh", "WARMPOOL_DOCKERD_LOG": "scripts/ensure-docker.sh",
    "WARMPOOL_DOCKER_DAEMON_JSON": "scripts/ensure-docker.sh", "WARMPOOL_DOCKER_WAIT_S": "scripts/ensure-docker.sh",
}
# Families: the image tags (WARMPOOL_IMAGE_<NAME>, checked against the catalogue by the caller), the test
# suite's and the second test engine's.
OTHER_PREFIXES = ("WARMPOOL_TEST_", "WARMPOOL_DOCKER2_", "WARMPOOL_DASHBOARD_")


def known_variables() -> set[str]:
    return {variable(name) for name in EnvSettings.model_fields} | set(OTHER_READERS)


def unknown_variables(env: Mapping[str, str], image_variables: set[str]) -> list[str]:
    """A line per `WARMPOOL_*` name in `env` that nothing reads, with the nearest real name when one is close;
    `image_variables` are the catalogue's tag variables (WARMPOOL_IMAGE_DATASCIENCE, ...)."""
    known = known_variables() | image_variables
    lines = []
    for name in sorted(env):
        if not name.upper().startswith(PREFIX) or name.upper() in known or name.upper().startswith(OTHER_PREFIXES):
            continue
        close = difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.75)
        lines.append(f"{name} is not a setting warmpool reads; ignored"
                     + (f" (did you mean {close[0]}?)" if close else ""))
    if env.get("WARMPOOL_API_KEY") and not env.get("WARMPOOL_API_KEYS"):
        lines.append("WARMPOOL_API_KEY is the key clients send (warmpool run, warmpool mcp); the server's keys are "
                     "WARMPOOL_API_KEYS, which is not set")
    return lines
