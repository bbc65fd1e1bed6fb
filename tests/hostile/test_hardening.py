"""The security defaults (README, Security), read back from the engine and from inside a running task."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import SCRATCH_ROOT
from tests.hostile.conftest import IMAGE_ENV, MIB, PIDS_LIMIT, STORAGE_BYTES, box_container, execute

pytestmark = pytest.mark.docker

SECRET = "hostile-suite-secret-value"

INSIDE = r"""
import ctypes, json, os
status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines() if ':' in line)
libc = ctypes.CDLL(None, use_errno=True)
mounts = {}
for line in open('/proc/self/mountinfo'):
    fields = line.split()
    mounts[fields[4]] = fields[5].split(',') + fields[fields.index('-') + 3].split(',')
print(json.dumps({
    "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "cap_eff": status['CapEff'].strip(), "cap_prm": status['CapPrm'].strip(), "cap_amb": status['CapAmb'].strip()
        if 'CapAmb' in status else '0000000000000000',
    "seccomp": status.get('Seccomp', '?').strip(),
    "no_new_privs": libc.prctl(39, 0, 0, 0, 0),  # PR_GET_NO_NEW_PRIVS: gVisor's status file lacks the line
    "env": dict(os.environ),
    "mounts": mounts,
    "docker_sock": [p for p in ('/var/run/docker.sock', '/run/docker.sock') if os.path.exists(p)],
}))
"""


def test_engine_applies_every_default(box, docker_client):
    inspect = docker_client.api.inspect_container(box_container(box, docker_client).id)
    host = inspect["HostConfig"]
    assert host["NetworkMode"] == "none" and inspect["NetworkSettings"]["Networks"].keys() <= {"none"}
    assert host["ReadonlyRootfs"] is True and host["Privileged"] is False
    assert host["CapDrop"] == ["ALL"] and sorted(host["CapAdd"]) == ["KILL", "SETGID", "SETUID"]
    assert host["SecurityOpt"] == ["no-new-privileges"]  # and no "seccomp=unconfined": Docker's default profile
    assert host["Memory"] > 0 and host["MemorySwap"] == host["Memory"]
    assert (host["CpuQuota"], host["CpuPeriod"]) == (50_000, 100_000)  # 0.5 cpu
    if box.runtime == "runc":
        assert host["PidsLimit"] == PIDS_LIMIT
    else:  # the Sentry's own threads count on the host; the tier's limit applies inside (RLIMIT_NPROC)
        assert host["Runtime"] == "runsc" and PIDS_LIMIT < host["PidsLimit"] <= PIDS_LIMIT + 10_000
    assert not host.get("Tmpfs")  # scratch is disk: see test_scratch_is_its_own_filesystem_on_disk
    assert host["ShmSize"] == min(STORAGE_BYTES, 64 * MIB)
    assert host["LogConfig"]["Type"] == "none"
    assert {u["Name"]: (u["Soft"], u["Hard"]) for u in host["Ulimits"]} == {
        "nofile": (256, 256), "fsize": (STORAGE_BYTES, STORAGE_BYTES), "core": (0, 0)}
    assert host["IpcMode"] == "private"
    # No host path, volume or socket: nothing mounted but what the engine itself provides, and the
    # container's own scratch filesystem (made for it, empty, and gone with it).
    (scratch,) = inspect["Mounts"]
    assert scratch["Type"] == "bind" and scratch["Destination"] == "/tmp" and scratch["RW"] is True
    assert scratch["Source"].startswith(f"{SCRATCH_ROOT}/{box.instance_id}/")
    assert [m["Source"] for m in host["Mounts"]] == [scratch["Source"]]
    assert not host["Binds"] and not host["VolumesFrom"]
    assert not host["Devices"] and not host.get("DeviceRequests")
    # The container's environment is the image's own (see IMAGE_ENV): nothing of the server's is passed on.
    assert {e.split("=", 1)[0] for e in inspect["Config"]["Env"] or []} <= IMAGE_ENV
    assert inspect["Config"]["Labels"]["warmpool.pool"] == box.instance_id


def test_scratch_is_its_own_filesystem_on_disk(box, docker_client):
    """The bound directory is an ext4 filesystem of the tier's storage, mounted for this container alone,
    nosuid,nodev,noexec, from a loop device over an image file in the pool's state dir."""
    (scratch,) = docker_client.api.inspect_container(box_container(box, docker_client).id)["Mounts"]
    source = scratch["Source"]
    (mount,) = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()
                if line.split()[1] == source]
    device, _, fstype, options = mount[:4]
    assert fstype == "ext4" and {"rw", "nosuid", "nodev", "noexec"} <= set(options.split(",")), mount
    loop = Path("/sys/block", os.path.basename(device), "loop")
    assert loop.joinpath("backing_file").read_text().strip() == source + ".img"
    assert loop.joinpath("autoclear").read_text().strip() == "1"  # the device goes with the mount
    assert os.path.getsize(source + ".img") == STORAGE_BYTES
    fs = os.statvfs(source)
    assert 0.85 * STORAGE_BYTES < fs.f_blocks * fs.f_frsize <= STORAGE_BYTES  # the rest is ext4's metadata
    assert os.stat(source).st_mode & 0o7777 == 0o1777  # the filesystem's root, as /tmp's always is


def test_task_is_unprivileged_and_sees_no_secret(box):
    body = execute(box, INSIDE)
    assert body["status"] == "succeeded", body
    inside = json.loads(body["stdout"])
    assert inside["uid"] == inside["euid"] == inside["gid"] == 10001 and inside["groups"] == []
    assert inside["cap_eff"] == inside["cap_prm"] == inside["cap_amb"] == "0000000000000000"
    assert inside["no_new_privs"] == 1
    # Docker's default seccomp filter (mode 2) under runc; gVisor does not apply the OCI profile to the
    # sandboxed task (its Sentry is the kernel the task talks to, itself under a seccomp filter on the host).
    assert inside["seccomp"] == ("2" if box.runtime == "runc" else "0")
    assert set(inside["env"]) == {"HOME", "PATH", "LANG", "TMPDIR", "USER"}
    assert not any(SECRET in value or "WARMPOOL" in value for value in inside["env"].values())
    assert inside["docker_sock"] == []
    # gVisor's mountinfo does not list nosuid; noexec alone already stops any binary there (test_privileges)
    wanted = {"nosuid", "noexec"} if box.runtime == "runc" else {"noexec"}
    # Under gVisor /tmp is served by its gofer from the host's mount, whose flags (nosuid,nodev,noexec:
    # test_scratch_is_its_own_filesystem_on_disk) the sandbox's mount table does not show; a binary there
    # still cannot run (test_privileges).
    for scratch in ("/tmp", "/dev/shm") if box.runtime == "runc" else ("/dev/shm",):
        assert wanted <= set(inside["mounts"][scratch]), inside["mounts"][scratch]
    assert "ro" in inside["mounts"]["/"]


def test_server_environment_never_reaches_the_task(serve):
    """Keys and other settings of the server live in its environment; a task sees none of them."""
    svc = serve(env={"WARMPOOL_API_KEYS": SECRET, "WARMPOOL_ADMIN_KEY": SECRET + "-admin"})
    code = r"""
import os
seen = []
for path in ['/proc/self/environ', '/proc/1/environ', '/proc/1/cmdline']:
    try:
        seen.append(open(path, 'rb').read().decode('latin-1'))
    except OSError as exc:
        seen.append(type(exc).__name__)
print(repr(seen))
"""
    response = svc.client.post("/v1/execute", json={"code": code}, headers={"Authorization": f"Bearer {SECRET}"})
    body = response.json()
    assert body["status"] == "succeeded", body
    assert SECRET not in body["stdout"] and "WARMPOOL" not in body["stdout"]
