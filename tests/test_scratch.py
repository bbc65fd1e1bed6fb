"""Storage is disk: each container's scratch is a filesystem of the tier's storage, a hard quota that does
not count against `ram` (DESIGN 1a), made and given back by pool/engine/scratch.py."""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path

import docker.errors
import pytest

from pool.engine.sandbox_spec import owner_token
from pool.engine.scratch import ScratchStore, loops_backed_under, mounts_under
from pool.model.errors import InvalidRequest
from pool.settings import from_env
from tests.conftest import SCRATCH_ROOT, containers_of, scratch_left, stop_service

MIB = 1024 ** 2

WRITE = """
import os, time
with open('big', 'wb') as f:
    chunk = b'x' * (1 << 20)
    for _ in range({mib}):
        f.write(chunk)
    f.flush()
    os.fsync(f.fileno())
print(os.path.getsize('big') >> 20, 'MiB written')
time.sleep({hold_s})  # the file is still there while the host samples the container's memory
"""


def host_mounts() -> list[list[str]]:
    return [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]


# ---- the store on its own (root and loop devices, no Docker) ---------------------------------------

def test_mount_points_are_read_unescaped_and_deepest_first():
    mountinfo = ("36 35 98:0 / /var/lib/warmpool/scratch/a/s-1 rw - ext4 /dev/loop0 rw\n"
                 "37 35 98:0 / /var/lib/warmpool/scratch/a/with\\040space rw - ext4 /dev/loop1 rw\n"
                 "38 35 98:0 / /var/lib/warmpool/scratch/a/s-1/deeper rw - ext4 /dev/loop2 rw\n"
                 "39 35 98:0 / /var/lib/warmpool/scratch/ab/s-1 rw - ext4 /dev/loop3 rw\n")
    assert mounts_under(mountinfo, "/var/lib/warmpool/scratch/a") == [
        "/var/lib/warmpool/scratch/a/s-1/deeper", "/var/lib/warmpool/scratch/a/s-1",
        "/var/lib/warmpool/scratch/a/with space"]


def test_loop_devices_are_found_by_backing_file_even_unlinked(tmp_path):
    for name, backing in (("loop0", "/state/a/s-1.img"), ("loop1", "/state/a/s-2.img (deleted)"),
                          ("loop2", "/state/ab/s-1.img")):
        (tmp_path / name / "loop").mkdir(parents=True)
        (tmp_path / name / "loop" / "backing_file").write_text(backing + "\n")
    (tmp_path / "loop3").mkdir()  # a free device has no loop/ dir
    assert sorted(loops_backed_under(tmp_path, "/state/a")) == ["/dev/loop0", "/dev/loop1"]


def test_scratch_mode_is_a_setting_checked_at_start():
    assert from_env({}).scratch == "disk"
    assert from_env({"WARMPOOL_SCRATCH": "memory"}).scratch == "memory"
    with pytest.raises(InvalidRequest) as refused:
        from_env({"WARMPOOL_SCRATCH": "ssd"})
    assert refused.value.field == "WARMPOOL_SCRATCH"


@pytest.fixture
def store():
    """A scratch store of its own (a test instance dir under the default root), closed and checked after."""
    made = ScratchStore(SCRATCH_ROOT, f"test-store-{secrets.token_hex(4)}", owner_token())
    made.open()
    yield made
    made.close()
    assert not os.path.exists(made.instance_dir)


@pytest.mark.root
def test_a_slot_is_a_fresh_filesystem_of_its_size_and_goes_without_a_trace(store):
    slot = store.make("s-1", 64 * MIB)
    (mount,) = [m for m in host_mounts() if m[1] == slot.mount_dir]
    assert mount[2] == "ext4" and {"nosuid", "nodev", "noexec"} <= set(mount[3].split(","))
    assert os.listdir(slot.mount_dir) == [] and os.stat(slot.mount_dir).st_mode & 0o7777 == 0o1777
    fs = os.statvfs(slot.mount_dir)
    assert 0.9 * 64 * MIB < fs.f_bavail * fs.f_frsize < 64 * MIB
    assert os.stat(slot.image_path).st_blocks * 512 < 4 * MIB  # sparse: disk is used as tasks write
    (device,) = loops_backed_under(Path("/sys/block"), store.instance_dir)
    store.release(slot)
    assert not [m for m in host_mounts() if m[1] == slot.mount_dir]
    assert not os.path.exists(slot.image_path) and not os.path.exists(slot.mount_dir)
    assert device not in loops_backed_under(Path("/sys/block"), store.instance_dir)
    assert store.slots_out == 0


@pytest.mark.root
def test_closing_the_store_gives_back_every_slot(store):
    slots = [store.make(f"s-{i}", 16 * MIB) for i in range(3)]
    store.close()
    assert not any(m[1].startswith(store.instance_dir + "/") for m in host_mounts())
    assert loops_backed_under(Path("/sys/block"), store.instance_dir) == []
    assert not any(os.path.exists(slot.image_path) for slot in slots)


@pytest.mark.root
def test_a_dead_pools_slots_are_swept_and_a_live_ones_kept(store):
    dead = ScratchStore(SCRATCH_ROOT, f"test-dead-{secrets.token_hex(4)}", owner_token())
    dead.open()
    try:
        dead.make("s-1", 16 * MIB)
        # The pool dies without closing: its owner file names a process that no longer exists.
        Path(dead.instance_dir, "owner").write_text(owner_token().rsplit(":", 1)[0] + ":0")
        live_slot = store.make("s-1", 16 * MIB)
        assert store.sweep_orphans() >= 1
        assert not os.path.exists(dead.instance_dir)
        assert not any(m[1].startswith(dead.instance_dir + "/") for m in host_mounts())
        assert loops_backed_under(Path("/sys/block"), dead.instance_dir) == []
        assert [m for m in host_mounts() if m[1] == live_slot.mount_dir]  # the live pool's is untouched
    finally:
        dead.close()


# ---- through the service, on the real engine --------------------------------------------------------

def anon_bytes(stats: dict) -> int:
    """Memory the container cannot give back (anonymous pages, tmpfs included): cgroup v1 and v2 alike."""
    memory = stats["memory_stats"]["stats"]
    return int(memory["active_anon"]) + int(memory["inactive_anon"])


def file_cache_bytes(stats: dict) -> int:
    memory = stats["memory_stats"]["stats"]
    return int(memory.get("total_cache", memory.get("file", 0)))


def write_and_sample(svc, docker_client, mib: int, hold_s: float) -> tuple[dict, int, int]:
    """Run the write task while sampling its container's memory from the host: (body, max anon, max cache)."""
    (container,) = containers_of(docker_client, svc.instance_id)
    result: dict = {}
    task = threading.Thread(target=lambda: result.update(
        svc.execute(WRITE.format(mib=mib, hold_s=hold_s), timeout_s=60).json()))
    task.start()
    anon = cache = 0
    while task.is_alive():
        try:
            stats = docker_client.api.stats(container.id, stream=False, one_shot=True)
        except (docker.errors.APIError, ValueError):
            break  # the container is gone (and the task's result says why)
        if "stats" in stats.get("memory_stats", {}):
            anon, cache = max(anon, anon_bytes(stats)), max(cache, file_cache_bytes(stats))
    task.join()
    return result, anon, cache


def check_storage_is_disk(svc, docker_client, ram_bytes: int, fits_mib: int, too_big_mib: int) -> None:
    before = svc.execute("import socket; print(socket.gethostname())").json()["stdout"]
    body, anon, cache = write_and_sample(svc, docker_client, fits_mib, hold_s=2)
    assert body["status"] == "succeeded" and body["stdout"] == f"{fits_mib} MiB written\n", body
    assert fits_mib * MIB > ram_bytes  # more than the container's memory limit, on disk
    # The data went through the page cache (so the sampler saw the write) but never became memory the
    # container holds: a tmpfs would have put all of it in anonymous (shmem) pages, past the limit.
    assert cache > 32 * MIB and anon < 96 * MIB, (cache, anon)

    body = svc.execute(WRITE.format(mib=too_big_mib, hold_s=0), timeout_s=60).json()
    assert body["status"] == "failed" and body["exit_code"] == 1, body
    assert "OSError: [Errno 28] No space left on device" in body["stderr"], body["stderr"][-500:]

    # The reset emptied the filesystem: the same container takes the full write again.
    body = svc.execute(WRITE.format(mib=fits_mib, hold_s=0), timeout_s=60).json()
    assert body["status"] == "succeeded" and body["stdout"] == f"{fits_mib} MiB written\n", body
    assert svc.execute("import socket; print(socket.gethostname())").json()["stdout"] == before


@pytest.mark.docker
def test_seed_example_writes_900_mib_and_fails_cleanly_past_its_storage(serve, docker_client):
    """The seed's example 1 (512MB ram, 1GB storage): 900 MiB fit, 1.2 GB is ENOSPC (`failed`), then the
    same container takes 900 MiB again; stopping the service leaves no mount or loop device."""
    tiers = {"tiers": [{"name": "seed", "cpu": 2, "ram": "512MB", "storage": "1GB", "min_idle": 1, "max_size": 1}]}
    svc = serve(tiers=tiers)
    check_storage_is_disk(svc, docker_client, 512 * MIB, fits_mib=900, too_big_mib=1200)
    assert scratch_left(svc.instance_id)  # while it runs: its container's filesystem
    stop_service(svc, docker_client)  # fails if a mount, loop device or the state dir is left
    assert scratch_left(svc.instance_id) == []


@pytest.mark.docker
def test_under_gvisor_storage_is_disk_too(serve, docker_client):
    tiers = {"tiers": [{"name": "g", "cpu": 1, "ram": "128MiB", "storage": "256MiB", "min_idle": 1,
                        "max_size": 1, "runtime": "runsc"}]}
    svc = serve(tiers=tiers)
    check_storage_is_disk(svc, docker_client, 128 * MIB, fits_mib=200, too_big_mib=300)
    stop_service(svc, docker_client)
    assert scratch_left(svc.instance_id) == []
