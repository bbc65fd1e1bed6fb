"""A tier's cpu as a CFS quota over the configured period (pure: the arithmetic, the setting, the create
parameters docker-py builds from them; tests/test_service.py reads them back from a real container)."""

import docker
import pytest

from pool.engine.sandbox_spec import host_config_kwargs
from pool.model.cpu_quota import cfs_quota, reuse_cooldown_s
from pool.model.errors import InvalidRequest
from pool.model.resources import Resources
from pool.model.tiers import Tier
from pool.settings import Settings, from_env

MIB = 1024**2


@pytest.mark.parametrize(("cpu", "period_us", "expected"), [
    (0.5, 100_000, (100_000, 50_000)),  # Docker's --cpus 0.5
    (0.5, 10_000, (10_000, 5_000)),  # the same share over a tenth of the period
    (2.0, 10_000, (10_000, 20_000)),  # more cpus than one: quota above the period
    (0.05, 10_000, (20_000, 1_000)),  # the quota would be 0.5 ms: the period grows to keep the 1 ms minimum
    (0.001, 1_000, (1_000_000, 1_000)),  # capped at the kernel's 1 s period
])
def test_the_quota_is_the_share_of_the_period(cpu, period_us, expected):
    assert cfs_quota(cpu, period_us) == expected


@pytest.mark.parametrize(("cpu", "period_us"), [(0.5, 999), (0.5, 1_000_001), (0, 100_000)])
def test_out_of_bounds_is_refused(cpu, period_us):
    with pytest.raises(ValueError):
        cfs_quota(cpu, period_us)


def test_the_setting_is_read_and_checked():
    assert Settings().cpu_period_us == 100_000 and from_env({}).cpu_period_us == 100_000
    assert from_env({"WARMPOOL_CPU_PERIOD_US": "10000"}).cpu_period_us == 10_000
    with pytest.raises(InvalidRequest) as refused:
        from_env({"WARMPOOL_CPU_PERIOD_US": "500"})
    assert refused.value.field == "WARMPOOL_CPU_PERIOD_US"


def test_docker_gets_quota_and_period_instead_of_nano_cpus():
    tier = Tier("t", Resources(0.5, 0, 64 * MIB, 32 * MIB))
    api = docker.APIClient(base_url="unix:///nonexistent.sock", version="1.43")  # builds, never connects
    built = api.create_host_config(**host_config_kwargs(tier, nofile_limit=256, cpu_period_us=20_000))
    assert (built["CpuQuota"], built["CpuPeriod"]) == (10_000, 20_000) and "NanoCpus" not in built


def test_the_cooldown_is_the_housekeeping_over_the_share():
    assert reuse_cooldown_s(0.5) == pytest.approx(0.010) and reuse_cooldown_s(2.0) == pytest.approx(0.0025)
    assert reuse_cooldown_s(0.5, 0.0) == 0.0
    assert from_env({}).reuse_cooldown_cpu_ms == 5.0
    assert from_env({"WARMPOOL_REUSE_COOLDOWN_CPU_MS": "0"}).reuse_cooldown_cpu_ms == 0.0
