"""Settings, read once from the environment (prefix ``WARMPOOL_``) and an optional tiers file."""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from pool.env_settings import SettingsError, read_env, unknown_variables
from pool.model import cpu_quota
from pool.model import images as catalogue
from pool.model.callback_rules import CallbackPolicy
from pool.model.errors import InvalidRequest
from pool.model.images import ImageSpec
from pool.model.result_bounds import Bounds, largest_task_bytes
from pool.model.tiers import Tier, default_tiers, sorted_tiers, tiers_from_config
from pool.model.warming import WarmingPolicy
from pool.sizes_file import apply_sizes, load_sizes

log = logging.getLogger(__name__)

MIB = 1024 ** 2
GIB = 1024 ** 3
DEFAULT_MAX_FILES_BYTES = 16 * MIB


def default_max_body_bytes(max_files_bytes: int) -> int:
    """The body cap when none is set: 4 MiB (code, stdin and their JSON escapes) plus the request's files as
    base64, which takes 4 bytes per 3, plus 1 MiB for the entries' paths and quoting."""
    return 4 * MIB + -(-max_files_bytes // 3) * 4 + MIB


@dataclass(frozen=True)
class Settings:
    """Everything the service is configured with; built by `from_env` and then never changed."""

    tiers: tuple[Tier, ...] = field(default_factory=default_tiers)
    # The images this deployment knows (built-ins and the tiers file's), docker tags from the environment;
    # each tier serves one of them by name.
    images: tuple[ImageSpec, ...] = catalogue.BUILTIN
    instance_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}")
    docker_host: str | None = None
    lease_timeout_s: float = 5.0
    default_timeout_s: float = 10.0
    max_timeout_s: float = 60.0
    max_code_bytes: int = MIB
    max_stdin_bytes: int = MIB
    # A request's `files`, decoded, in all; and a result's output files (their content past it is null).
    max_files_bytes: int = DEFAULT_MAX_FILES_BYTES
    max_output_files_bytes: int = DEFAULT_MAX_FILES_BYTES
    # The whole request body, checked before it is parsed: JSON escapes can make code take up to 6 bytes
    # per byte, and files go as base64, so this stays well above what the other caps let through, yet far
    # below what a flood sends (default_max_body_bytes).
    max_body_bytes: int = default_max_body_bytes(DEFAULT_MAX_FILES_BYTES)
    output_limit_bytes: int = MIB
    nofile_limit: int = 256
    # The CFS period of every sandbox's cpu quota (the quota is the tier's cpu times it). A task that uses
    # its quota up waits for the rest of the period; the runner's reset and pre-fork after each task count
    # against the same quota. See pool/model/cpu_quota.py and benchmarks/RESULTS.md for why 100 ms stays.
    cpu_period_us: int = cpu_quota.DEFAULT_PERIOD_US
    # A short task's cpu in its sandbox, the runner's housekeeping after it included: an idle container
    # rests this over its tier's cpu before it is leased again while another has rested longer (0: off,
    # always the most recently used one). See pool/model/cpu_quota.py.
    reuse_cooldown_cpu_ms: float = cpu_quota.TASK_HOUSEKEEPING_CPU_S * 1000
    start_concurrency: int = 4
    cpu_overcommit: float = 16.0
    host_cpus: float | None = None
    host_ram_bytes: int | None = None
    host_reserve_ram_bytes: int = 2 * GIB
    host_reserve_cpus: float = 0.0
    gpu_ids: tuple[str, ...] = ()  # declared GPU inventory; when empty, `nvidia-smi -L` is asked
    warming: WarmingPolicy = field(default_factory=WarmingPolicy)
    pool_sizes_file: str | None = None  # where admin resizes are kept across restarts; None: not kept
    api_keys: tuple[str, ...] = ()
    admin_key: str | None = None
    # Task submissions per API key (a token bucket); 0 turns the limit off, the default, because what is
    # fair depends on the deployment (a benchmark on loopback sends 400 a second).
    rate_limit_per_s: float = 0.0
    rate_limit_burst: int = 0  # 0: twice the rate (at least 1)
    # Leases that may wait for a busy tier at once; past it, requests are refused with 429 at once rather
    # than queued for a container they would not get in time.
    max_waiting: int = 256
    # The HTTP edge (api/edge.py): the request line plus headers, the time a whole request may take to
    # arrive, how long an idle keep-alive connection is kept, and open connections at once (kept below the
    # process's open-file limit, see api.edge.effective_max_connections).
    max_header_bytes: int = 16 * 1024
    request_read_timeout_s: float = 30.0
    keep_alive_timeout_s: float = 5.0
    max_connections: int = 1024
    # Async tasks (submitted, running, or finished and kept for result_ttl_s): per API key, a count and
    # bytes past which a submission is 429; across all keys, bytes and a count past which the oldest
    # finished results are evicted. See pool/result_bounds.py for what counts.
    max_tasks_per_key: int = 1000
    max_result_bytes_per_key: int = 256 * MIB
    max_results: int = 10_000
    max_result_bytes: int = GIB
    redis_url: str | None = None
    redis_prefix: str = "warmpool"  # every Redis key starts with it: several clusters can share one Redis
    result_ttl_s: float = 600.0
    max_queued: int = 1000  # per tier: tasks waiting or running (a Redis stream's length); past it, 429
    heartbeat_s: float = 1.0  # a worker beats this often; missing three beats, it is gone
    # A dead worker's unfinished tasks are claimed after this long (and once its beat has expired): with
    # three 1 s beats, a SIGKILLed worker's tasks are answered within about 3.5 s.
    visibility_timeout_s: float = 3.0
    worker_grace_s: float = 30.0  # on SIGTERM, how long a worker lets the tasks in hand finish
    worker_tiers: tuple[str, ...] = ()  # the tiers a worker serves; empty: all of them
    mode: str = "warm"
    # Where a task writes (/tmp, and its work dir and HOME inside it): "disk", a filesystem image of the
    # tier's storage per container, loop-mounted (root only; see pool/engine/scratch.py), or "memory", a
    # tmpfs that counts against the tier's ram.
    scratch: str = "disk"
    scratch_dir: str = "/var/lib/warmpool/scratch"
    max_batch: int = 100  # tasks in one POST /v1/tasks/batch
    # Callbacks: hosts or CIDRs that callback_url may name; empty (the default) turns callbacks off, because
    # a server that POSTs wherever a client says is a request-forgery hole into the operator's network.
    callback_allow: tuple[str, ...] = ()
    callback_secret: str = ""  # HMAC-SHA256 key of X-Warmpool-Signature; required when callback_allow is set
    callback_retry_s: float = 60.0  # retries with backoff stop once the first attempt is this old
    callback_attempt_timeout_s: float = 10.0  # one attempt, connection included
    callback_concurrency: int = 16  # attempts in flight at once, per API process
    # Sessions hold a container each: bounded per key, and closed after this long without a call (the
    # request's idle_timeout_s when it names one, up to max_session_idle_s).
    max_sessions_per_key: int = 4
    session_idle_timeout_s: float = 300.0
    max_session_idle_s: float = 3600.0

    def image(self, name: str) -> ImageSpec:
        """The configured image of that name; KeyError if there is none."""
        for spec in self.images:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def served_images(self) -> tuple[ImageSpec, ...]:
        """The images some tier serves: those the pool needs present."""
        names = {tier.image for tier in self.tiers}
        return tuple(spec for spec in self.images if spec.name in names)

    def result_bounds(self) -> Bounds:
        """The async results bound (pool/model/result_bounds.py) these settings give."""
        return Bounds(max_tasks_per_key=self.max_tasks_per_key, max_result_bytes_per_key=self.max_result_bytes_per_key,
                      max_results=self.max_results, max_result_bytes=self.max_result_bytes)


def _check_images(tiers: tuple[Tier, ...], images: tuple[ImageSpec, ...]) -> None:
    known = [spec.name for spec in images]
    for index, tier in enumerate(tiers):
        if tier.image not in known:
            raise InvalidRequest(f"tiers[{index}].image", f"tier {tier.name!r}: unknown image {tier.image!r}; "
                                 f"known: {known} (add one under 'images' in the tiers file)")


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from the environment; nothing needs a file to start. SettingsError (an InvalidRequest)
    names every bad variable; WARMPOOL_* names that nothing reads are logged as warnings."""
    env = os.environ if env is None else env
    values = read_env(env).set_values()
    tiers_file = values.pop("tiers_file", None)
    raw = catalogue.read_tiers_file(tiers_file) if tiers_file else None
    images = catalogue.with_env_tags(catalogue.images_from_config(raw), env)
    for line in unknown_variables(env, {catalogue.env_tag_variable(spec.name) for spec in images}):
        log.warning("%s", line)
    configured = tiers_from_config(raw, str(tiers_file)) if tiers_file else default_tiers()
    _check_images(configured, images)
    tiers = sorted_tiers(configured)
    if values.get("pool_sizes_file"):
        tiers = apply_sizes(tiers, load_sizes(values["pool_sizes_file"]))
    warm = {key: values.pop(f"warm_{key}") for key in ("window_s", "quiet_s", "burst_sigmas")
            if f"warm_{key}" in values}
    warming = WarmingPolicy(enabled=values.pop("warming", "on") == "on", **warm)
    for name in ("host_ram", "host_reserve_ram"):  # the variables' names carry no unit; the fields' do
        if name in values:
            values[f"{name}_bytes"] = values.pop(name)
    if "max_body_bytes" not in values:
        values["max_body_bytes"] = default_max_body_bytes(values.get("max_files_bytes", DEFAULT_MAX_FILES_BYTES))
    settings = Settings(tiers=tiers, images=images, warming=warming, docker_host=env.get("DOCKER_HOST") or None,
                        **values)
    if problems := cross_checks(settings):
        raise SettingsError(problems)
    CallbackPolicy.parse(settings.callback_allow)  # refuse a garbled allowlist at start, not at the first callback
    return settings


def cross_checks(settings: Settings) -> list[tuple[str, str]]:
    """What is wrong between settings that are each fine alone: (variable, why) naming the others involved."""
    problems = []
    if settings.default_timeout_s > settings.max_timeout_s:
        problems.append(("WARMPOOL_DEFAULT_TIMEOUT_S", f"{settings.default_timeout_s:g} s is above "
                         f"WARMPOOL_MAX_TIMEOUT_S ({settings.max_timeout_s:g} s): every request without a "
                         f"timeout_s would be refused; lower it or raise WARMPOOL_MAX_TIMEOUT_S"))
    if settings.session_idle_timeout_s > settings.max_session_idle_s:
        problems.append(("WARMPOOL_SESSION_IDLE_TIMEOUT_S", f"{settings.session_idle_timeout_s:g} s is above "
                         f"WARMPOOL_MAX_SESSION_IDLE_S ({settings.max_session_idle_s:g} s)"))
    if settings.admin_key is not None and settings.admin_key in settings.api_keys:
        problems.append(("WARMPOOL_ADMIN_KEY", "must differ from every key in WARMPOOL_API_KEYS"))
    if settings.callback_allow and not settings.callback_secret:
        problems.append(("WARMPOOL_CALLBACK_SECRET", "is required when WARMPOOL_CALLBACK_ALLOW is set: receivers "
                         "check each callback's signature with it"))
    largest = largest_task_bytes(settings.max_code_bytes, settings.max_stdin_bytes, settings.output_limit_bytes,
                                 settings.max_files_bytes, settings.max_output_files_bytes)
    for name, value in (("MAX_RESULT_BYTES_PER_KEY", settings.max_result_bytes_per_key),
                        ("MAX_RESULT_BYTES", settings.max_result_bytes)):
        # Each bound must hold at least one task of the largest allowed size, else every submission is 429.
        if value < largest:
            problems.append((f"WARMPOOL_{name}", f"must be at least {largest} bytes (the code, stdin and files "
                             f"caps, twice the output limit and the output files cap as base64), got {value}"))
    return problems
