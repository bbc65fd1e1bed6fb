"""Host inventory, GPU tiers and their container-create parameters, the ledger, the sizes file (no Docker)."""

import json
import os
import stat

import docker
import pytest

from pool.engine.backend import EngineInfo
from pool.engine.inventory import detect_gpu_ids, host_inventory, parse_gpu_list, unfit_reason
from pool.engine.sandbox_spec import host_config_kwargs
from pool.model.capacity import CapacityLedger, HostInventory
from pool.model.errors import CapacityError, InvalidRequest
from pool.model.resources import ResourceRequest, Resources
from pool.model.tiers import fit_tier
from pool.settings import from_env
from pool.sizes_file import load_sizes, save_sizes

MIB, GIB = 1024**2, 1024**3

NVIDIA_SMI_L = """\
GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77)
  MIG 3g.20gb     Device  0: (UUID: MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f)
  MIG 3g.20gb     Device  1: (UUID: MIG-0b2c5d6e-1f3a-5b4c-8d7e-9f0a1b2c3d4e)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-1a2b3c4d-0000-1111-2222-333344445555)
GPU 2: Tesla T4 (UUID: GPU-99999999-8888-7777-6666-555544443333)
"""

GPU_TIERS = {"tiers": [
    {"name": "cpu", "cpu": 1, "ram": "256MiB", "storage": "64MiB", "min_idle": 1, "max_size": 4},
    {"name": "gpu2", "cpu": 4, "gpu": 2, "ram": "4GiB", "storage": "1GiB", "min_idle": 0, "max_size": 2},
    {"name": "gpu1", "cpu": 2, "gpu": 1, "ram": "8GiB", "storage": "1GiB", "min_idle": 1, "max_size": 2},
]}


@pytest.fixture
def gpu_settings(tmp_path):
    tiers = tmp_path / "tiers.json"
    tiers.write_text(json.dumps(GPU_TIERS))
    return from_env({"WARMPOOL_TIERS_FILE": str(tiers), "WARMPOOL_GPU_IDS": "GPU-a, GPU-b,GPU-c",
                     "WARMPOOL_HOST_RESERVE_CPUS": "0.5", "WARMPOOL_CPU_OVERCOMMIT": "4"})


def test_nvidia_smi_listing_gives_gpu_uuids_and_mig_devices_in_place_of_their_gpu():
    assert parse_gpu_list(NVIDIA_SMI_L) == (
        "MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f", "MIG-0b2c5d6e-1f3a-5b4c-8d7e-9f0a1b2c3d4e",
        "GPU-1a2b3c4d-0000-1111-2222-333344445555", "GPU-99999999-8888-7777-6666-555544443333")
    assert parse_gpu_list("") == ()
    assert parse_gpu_list("No devices were found\n") == ()


def test_gpus_are_detected_with_nvidia_smi_when_it_is_on_the_path(tmp_path, monkeypatch):
    system_path = os.environ.get("PATH", "/usr/bin:/bin")
    empty, bin_dir = tmp_path / "empty", tmp_path / "bin"
    empty.mkdir()
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert detect_gpu_ids() == (), "no nvidia-smi: no GPUs"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{system_path}")
    tool = bin_dir / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\ncat <<'EOF'\n{NVIDIA_SMI_L}EOF\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    assert len(detect_gpu_ids()) == 4
    tool.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert detect_gpu_ids() == (), "a failing nvidia-smi means no GPUs, not a crash"


def test_inventory_is_the_engine_less_the_reserve_with_the_declared_gpus(gpu_settings):
    engine = EngineInfo(cpus=8, ram_bytes=34 * GIB, runtimes=("runc",))
    inventory = host_inventory(gpu_settings, engine, detected_gpu_ids=("GPU-detected",))
    assert inventory.cpus == 7.5 and inventory.cpu_budget == 30
    assert inventory.ram_bytes == 32 * GIB, "the default reserve is 2 GiB"
    assert inventory.gpu_ids == ("GPU-a", "GPU-b", "GPU-c"), "declared GPUs win over detected ones"
    undeclared = from_env({})
    assert host_inventory(undeclared, engine, ("GPU-detected",)).gpu_ids == ("GPU-detected",)


def test_a_gpu_request_maps_to_the_smallest_gpu_tier_that_fits(gpu_settings):
    tiers = gpu_settings.tiers
    assert [t.name for t in tiers] == ["cpu", "gpu1", "gpu2"], "GPUs first in the order: gpu1 before gpu2"
    assert fit_tier(tiers, ResourceRequest(gpu=1)).name == "gpu1"
    assert fit_tier(tiers, ResourceRequest(gpu=1, ram_bytes=4 * GIB)).name == "gpu1"
    assert fit_tier(tiers, ResourceRequest(gpu=2)).name == "gpu2"
    assert fit_tier(tiers, ResourceRequest(gpu=0, ram_bytes=128 * MIB)).name == "cpu"


def test_gpu_containers_get_exactly_their_gpus_as_device_requests(gpu_settings):
    """The create parameters a GPU container gets, as docker-py sends them to the engine."""
    gpu2 = next(t for t in gpu_settings.tiers if t.name == "gpu2")
    ledger = CapacityLedger(host_inventory(gpu_settings, EngineInfo(8, 34 * GIB, ("runc",)), ()))
    gpu_ids = ledger.reserve(gpu2.resources)
    assert gpu_ids == ("GPU-a", "GPU-b")
    kwargs = host_config_kwargs(gpu2, nofile_limit=256, gpu_ids=gpu_ids)
    api = docker.APIClient(base_url="unix:///nonexistent.sock", version="1.43")  # builds, never connects
    host_config = api.create_host_config(**kwargs)
    assert host_config["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": 0, "DeviceIDs": ["GPU-a", "GPU-b"], "Capabilities": [["gpu"]], "Options": {}}]
    assert host_config["NetworkMode"] == "none"
    assert (host_config["CpuQuota"], host_config["CpuPeriod"]) == (400_000, 100_000), "4 cpus"
    cpu = next(t for t in gpu_settings.tiers if t.name == "cpu")
    assert "DeviceRequests" not in api.create_host_config(**host_config_kwargs(cpu, nofile_limit=256))


def test_the_ledger_gives_each_gpu_to_one_container_and_takes_it_back(gpu_settings):
    ledger = CapacityLedger(HostInventory(cpus=8, ram_bytes=64 * GIB, gpu_ids=("GPU-a", "GPU-b", "GPU-c")))
    gpu1 = next(t for t in gpu_settings.tiers if t.name == "gpu1").resources
    gpu2 = next(t for t in gpu_settings.tiers if t.name == "gpu2").resources
    first = ledger.reserve(gpu2)
    second = ledger.reserve(gpu1)
    assert set(first).isdisjoint(second) and len({*first, *second}) == 3
    assert ledger.room_for(gpu1) == 0
    with pytest.raises(CapacityError, match="gpu: 1 wanted, 0 free"):
        ledger.reserve(gpu1)
    ledger.release(gpu2, first)  # the container went: its GPUs are free again
    assert ledger.room_for(gpu1) == 2 and ledger.room_for(gpu2) == 1
    assert set(ledger.reserve(gpu2)) == set(first)


def test_room_for_counts_every_dimension():
    ledger = CapacityLedger(HostInventory(cpus=2, ram_bytes=GIB, cpu_overcommit=2))
    assert ledger.room_for(Resources(0.5, 0, 128 * MIB, MIB)) == 8
    assert ledger.room_for(Resources(1, 0, 64 * MIB, MIB)) == 4, "cpu: 4 / 1"
    ledger.reserve(Resources(1, 0, 512 * MIB, MIB))
    assert ledger.room_for(Resources(0.25, 0, 256 * MIB, MIB)) == 2, "memory: 512 MiB left"
    assert ledger.room_for(Resources(0.25, 1, MIB, MIB)) == 0, "no GPUs at all"


def test_a_tier_the_host_can_never_hold_is_named_by_dimension(gpu_settings):
    inventory = HostInventory(cpus=2, ram_bytes=6 * GIB, gpu_ids=("GPU-a",), cpu_overcommit=1)
    reasons = {t.name: unfit_reason(inventory, t) for t in gpu_settings.tiers}
    assert reasons["cpu"] is None
    assert reasons["gpu2"].field == "resources.gpu" and "needs 2 GPU(s) but this host has 1" in reasons["gpu2"].message
    assert reasons["gpu1"].field == "resources.ram", "one GPU is there, but not 8 GiB of memory"


def test_a_gpu_tier_file_entry_holds_whole_gpus(tmp_path):
    path = tmp_path / "tiers.json"
    path.write_text(json.dumps({"tiers": [{"name": "half", "gpu": 0.5}]}))
    with pytest.raises(InvalidRequest, match="whole GPUs"):
        from_env({"WARMPOOL_TIERS_FILE": str(path)})


def test_sizes_file_round_trip_and_it_overrides_the_tiers_at_start(tmp_path):
    sizes = tmp_path / "sizes.json"
    assert load_sizes(sizes) == {}, "a file that does not exist yet holds no sizes"
    save_sizes(sizes, {"nano": {"min_idle": 0, "max_size": 3}, "gone": {"min_idle": 1, "max_size": 1}})
    assert [p.name for p in tmp_path.iterdir()] == ["sizes.json"], "no temporary file left behind"
    settings = from_env({"WARMPOOL_POOL_SIZES_FILE": str(sizes)})
    nano = next(t for t in settings.tiers if t.name == "nano")
    assert (nano.min_idle, nano.max_size) == (0, 3) and settings.pool_sizes_file == str(sizes)
    assert from_env({}).pool_sizes_file is None


@pytest.mark.parametrize("content", ['{"tiers": []}', "not json", '{"tiers": {"nano": {"min_idle": "two"}}}',
                                    '{"tiers": {"nano": {"colour": 1}}}', '{"tiers": {"nano": {"min_idle": 99}}}'])
def test_a_bad_sizes_file_is_named(tmp_path, content):
    sizes = tmp_path / "sizes.json"
    sizes.write_text(content)
    with pytest.raises(InvalidRequest) as info:
        from_env({"WARMPOOL_POOL_SIZES_FILE": str(sizes)})
    assert "WARMPOOL_POOL_SIZES_FILE" in info.value.field


def test_warming_settings_are_read_from_the_environment():
    policy = from_env({"WARMPOOL_WARM_WINDOW_S": "2", "WARMPOOL_WARM_QUIET_S": "3",
                       "WARMPOOL_WARM_BURST_SIGMAS": "0"}).warming
    assert (policy.enabled, policy.window_s, policy.quiet_s, policy.burst_sigmas) == (True, 2, 3, 0)
    assert from_env({"WARMPOOL_WARMING": "off"}).warming.enabled is False
    with pytest.raises(InvalidRequest, match="WARMPOOL_WARMING"):
        from_env({"WARMPOOL_WARMING": "maybe"})

