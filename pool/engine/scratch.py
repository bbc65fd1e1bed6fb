"""Disk scratch: one ext4 filesystem image per container, loop-mounted on the host, bound in as its /tmp.

The tier's `storage` is the size of that filesystem, so it is a hard quota on everything the task may
write (its work dir, HOME, /tmp and /var/tmp all live there), on disk and not in the container's memory
(a tmpfs would count against `ram`). Docker's overlay2 on ext4 has no per-container quota, and xfs project
quotas need a dedicated filesystem, so each container gets a filesystem of its own instead:

    <root>/<instance>/owner         the owning process (host:pid:start), to judge orphans at the next start
    <root>/<instance>/<slot>.img    a sparse file of the tier's storage size, mkfs.ext4 (no journal)
    <root>/<instance>/<slot>/       its mount point (mode 000 beneath the mount: see `_build`)

Blocking (run it in threads), root only. The host never walks what a sandbox wrote: a slot is given back by
unmounting it and unlinking its image (a replaced container gets a fresh one), and the sweep of a dead
pool's slots unmounts, detaches and unlinks by name, only entries the store itself made.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from pool.engine.sandbox_spec import owner_is_alive, owner_token
from pool.model.errors import SandboxError
from pool.model.resources import format_bytes
from pool.settings import Settings

log = logging.getLogger(__name__)

# Scratch needs no crash consistency (a slot never outlives its container, nor an image its pool), so no
# journal and no blocks reserved for root: the whole image is the task's (about 95% of it usable: inode
# tables, and the 2% ext4 keeps back from everyone). 4 KiB blocks, an inode per 8 KiB (16,384 files in
# 128 MiB, 131,072 in 1 GiB). Prezeroed: a new sparse file reads as zeros, so neither mkfs nor the
# kernel's lazy init writes inode tables out.
_MKFS_COMMON = ("-q", "-F", "-T", "default", "-i", "8192", "-m", "0", "-O", "^has_journal")
MKFS_OPTIONS = (*_MKFS_COMMON, "-E", "nodiscard,assume_storage_prezeroed=1")
MKFS_FALLBACK_OPTIONS = (*_MKFS_COMMON, "-E", "nodiscard")  # e2fsprogs before 1.47
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_NOATIME = 0x2, 0x4, 0x8, 0x400
MOUNT_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME
MNT_DETACH, UMOUNT_NOFOLLOW = 0x2, 0x8
COMMAND_TIMEOUT_S = 30.0
PROBE_BYTES = 4 * 1024 * 1024
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
_LIBC = ctypes.CDLL(None, use_errno=True)
# Two `losetup --find` at once may pick the same free device; the loser sleeps 200 ms and tries again
# (util-linux): with four starts at once, attaches of up to 290 ms. One attach at a time in this process
# (5 ms each) instead.
_ATTACH_LOCK = threading.Lock()
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class ScratchSlot:
    """A mounted scratch filesystem of one container."""

    name: str
    image_path: str
    mount_dir: str
    size_bytes: int


def safe_name(text: str) -> str:
    """`text` as one path component (what a tier or instance name may hold beyond that is replaced)."""
    return _SAFE_NAME.sub("_", text)[:100] or "_"


def unescape_mountinfo(field: str) -> str:
    """Mount points in /proc/self/mountinfo escape space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(mountinfo: str, directory: str) -> list[str]:
    """Mount points strictly inside `directory`, deepest first (the order to unmount them in)."""
    prefix = directory.rstrip("/") + "/"
    points = {unescape_mountinfo(line.split()[4]) for line in mountinfo.splitlines() if len(line.split()) > 4}
    return sorted((p for p in points if p.startswith(prefix)), key=lambda p: (-p.count("/"), p))


def loops_backed_under(sys_block: Path, directory: str) -> list[str]:
    """Loop devices (``/dev/loopN``) whose backing file lies inside `directory` (unlinked ones too)."""
    prefix = directory.rstrip("/") + "/"
    found = []
    for backing in sys_block.glob("loop*/loop/backing_file"):
        try:
            path = backing.read_text().rstrip("\n").removesuffix(" (deleted)")
        except OSError:
            continue  # detached meanwhile
        if path.startswith(prefix):
            found.append(f"/dev/{backing.parent.parent.name}")
    return found


def scratch_store(settings: Settings) -> ScratchStore | None:
    """The disk scratch of a pool on the local Docker engine (WARMPOOL_SCRATCH=disk); None for a tmpfs."""
    if settings.scratch != "disk":
        return None
    return ScratchStore(settings.scratch_dir, settings.instance_id, owner_token())


class ScratchStore:
    """The scratch filesystems of one pool instance (see the module docstring)."""

    def __init__(self, root_dir: str, instance_id: str, owner: str) -> None:
        self.root_dir = os.path.abspath(root_dir)
        self.instance_dir = os.path.join(self.root_dir, safe_name(instance_id))
        self.owner = owner
        self._slots: dict[str, ScratchSlot] = {}
        self._lock = threading.Lock()  # make/release run in worker threads
        self._mkfs_options = MKFS_OPTIONS
        self._tools: dict[str, str] = {}
        self._claimed = False  # whether the instance dir is ours to remove

    # lifecycle -------------------------------------------------------------------------------------
    def open(self, worst_case_bytes: int = 0) -> None:
        """Check that this host can do it, make the instance dir, and prove it with one small slot."""
        if os.geteuid() != 0:
            raise SandboxError("disk scratch (WARMPOOL_SCRATCH=disk) loop-mounts a filesystem per container, "
                               "which needs root: run the service as root, or set WARMPOOL_SCRATCH=memory "
                               "(scratch in a tmpfs that counts against the tier's ram)")
        for tool, package in (("mkfs.ext4", "e2fsprogs"), ("losetup", "mount")):
            found = shutil.which(tool, path=SBIN_PATH)
            if found is None:
                raise SandboxError(f"disk scratch needs {tool} (Debian package {package}); "
                                   "install it or set WARMPOOL_SCRATCH=memory")
            self._tools[tool] = found
        try:
            os.makedirs(self.root_dir, mode=0o711, exist_ok=True)
            self._claim_instance_dir()
            free_bytes = shutil.disk_usage(self.root_dir).free
        except OSError as exc:
            raise SandboxError(f"disk scratch cannot use {self.root_dir} (WARMPOOL_SCRATCH_DIR): {exc}") from exc
        if worst_case_bytes:
            if worst_case_bytes > free_bytes:
                log.warning("the tiers at max_size may write %s of scratch, but %s has %s free: a task that "
                            "fills its storage then may fail with EIO instead of ENOSPC",
                            format_bytes(worst_case_bytes), self.root_dir, format_bytes(free_bytes))
        self.release(self.make("probe", PROBE_BYTES))

    def _claim_instance_dir(self) -> None:
        """Make the instance dir with its owner file in place (made aside, then renamed: the sweep of
        another pool never sees it without an owner)."""
        if os.path.isdir(self.instance_dir):
            if not owner_is_dead(self.instance_dir):
                raise SandboxError(f"{self.instance_dir} is held by a live pool with the same instance id "
                                   "(WARMPOOL_INSTANCE_ID must be unique per process)")
            remove_instance_dir(self.instance_dir)  # an earlier process of the same id died
        making = f"{self.instance_dir}.{os.getpid()}.new"
        os.makedirs(making, mode=0o711, exist_ok=True)
        Path(making, "owner").write_text(self.owner)
        os.rename(making, self.instance_dir)
        self._claimed = True

    def close(self) -> None:
        """Give back every slot still out (their containers are gone, or going), then the instance dir."""
        if not self._claimed:
            return
        with self._lock:
            slots = list(self._slots.values())
        for slot in slots:
            try:
                self.release(slot)
            except SandboxError as exc:
                log.warning("%s", exc)
        remove_instance_dir(self.instance_dir)

    # slots -----------------------------------------------------------------------------------------
    def make(self, name: str, size_bytes: int) -> ScratchSlot:
        """A fresh, empty, mounted filesystem of `size_bytes`, its root mode 1777 (as /tmp is)."""
        slot_name = safe_name(name)
        slot = ScratchSlot(slot_name, os.path.join(self.instance_dir, f"{slot_name}.img"),
                           os.path.join(self.instance_dir, slot_name), size_bytes)
        with self._lock:
            if slot_name in self._slots:
                raise SandboxError(f"scratch slot {slot_name} is already in use")
            self._slots[slot_name] = slot
        try:
            self._build(slot)
        except BaseException as exc:
            self.release(slot)
            if isinstance(exc, OSError):
                raise SandboxError(f"could not make the scratch filesystem {slot.image_path}: {exc}") from exc
            raise
        return slot

    def _build(self, slot: ScratchSlot) -> None:
        with open(slot.image_path, "xb") as image:  # x: never reuse a file someone left there
            image.truncate(slot.size_bytes)  # sparse: disk is used only as the task writes
        self._mkfs(slot.image_path)
        # The mount point itself is root's with no permission bits: should the engine ever bind it without
        # our filesystem on it (a dockerd in another mount namespace), the runner cannot use it and the
        # container fails its handshake, instead of writing to the host's disk without a quota.
        os.mkdir(slot.mount_dir, 0o000)
        with _ATTACH_LOCK:
            device = self._run([self._tools["losetup"], "--find", "--show", "--direct-io=on", slot.image_path],
                               f"attach {slot.image_path} to a loop device").strip()
        try:
            if _LIBC.mount(device.encode(), slot.mount_dir.encode(), b"ext4", MOUNT_FLAGS, None) != 0:
                raise SandboxError(f"could not mount {device} on {slot.mount_dir}: "
                                   f"{os.strerror(ctypes.get_errno())}")
        finally:
            # Detaching a mounted loop device only marks it to go with its last unmount (autoclear), so
            # no loop device outlives its mount; one that never got mounted goes now.
            self._run([self._tools["losetup"], "--detach", device], f"release {device}")
        # A brand-new filesystem that no sandbox has seen yet: safe to touch by path.
        os.rmdir(os.path.join(slot.mount_dir, "lost+found"))
        os.chmod(slot.mount_dir, 0o1777)

    def _mkfs(self, image_path: str) -> None:
        try:
            self._run([self._tools["mkfs.ext4"], *self._mkfs_options, image_path], f"make a filesystem in {image_path}")
        except SandboxError:
            if self._mkfs_options is MKFS_FALLBACK_OPTIONS:
                raise
            self._mkfs_options = MKFS_FALLBACK_OPTIONS  # an older mke2fs without assume_storage_prezeroed
            self._run([self._tools["mkfs.ext4"], *self._mkfs_options, image_path], f"make a filesystem in {image_path}")

    def release(self, slot: ScratchSlot) -> None:
        """Unmount (lazily when its container still holds it), unlink the image, remove the mount point."""
        with self._lock:
            self._slots.pop(slot.name, None)
        unmount(slot.mount_dir)
        for remove, path in ((os.unlink, slot.image_path), (os.rmdir, slot.mount_dir)):
            try:
                remove(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise SandboxError(f"could not remove {path}: {exc.strerror}") from exc

    @property
    def slots_out(self) -> int:
        with self._lock:
            return len(self._slots)

    # orphans ---------------------------------------------------------------------------------------
    def sweep_orphans(self) -> int:
        """Remove the instance dirs (mounts, loop devices, images) of pools whose owning process is gone."""
        swept = 0
        try:
            entries = list(os.scandir(self.root_dir))
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise SandboxError(f"could not list {self.root_dir}: {exc.strerror}") from exc
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False) or entry.path == self.instance_dir:
                continue
            if owner_is_dead(entry.path):
                remove_instance_dir(entry.path)
                swept += 1
        if swept:
            log.info("removed the scratch filesystems of %d dead pool(s)", swept)
        return swept

    @staticmethod
    def _run(args: list[str], doing: str) -> str:
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                                  env={"PATH": SBIN_PATH, "LC_ALL": "C"})
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SandboxError(f"could not {doing}: {exc}") from exc
        if done.returncode != 0:
            raise SandboxError(f"could not {doing}: {done.stderr.strip()[-300:] or f'exit {done.returncode}'}")
        return done.stdout


def unmount(mount_dir: str) -> None:
    """Unmount without following a symlink; lazily when still busy (a container not yet fully gone)."""
    path = mount_dir.encode()
    if _LIBC.umount2(path, UMOUNT_NOFOLLOW) == 0:
        return
    failed = ctypes.get_errno()
    if failed in (errno.EINVAL, errno.ENOENT):
        return  # not mounted (any more), or never made
    if failed == errno.EBUSY and _LIBC.umount2(path, UMOUNT_NOFOLLOW | MNT_DETACH) == 0:
        return
    raise SandboxError(f"could not unmount {mount_dir}: {os.strerror(ctypes.get_errno() or failed)}")


def owner_is_dead(directory: str) -> bool:
    """Whether the process named in an instance dir's owner file is gone. An unreadable owner file is a
    dir being made by a live pool (the owner is written before the dir gets its name): not dead."""
    try:
        owner = Path(directory, "owner").read_text()
    except OSError:
        return False
    return owner_is_alive(owner) is False


def remove_instance_dir(directory: str) -> None:
    """Unmount, detach and unlink whatever a pool instance left in `directory`, then remove it. Only the
    dir's own entries are removed, each by name: nothing inside a scratch filesystem is ever walked."""
    for point in mounts_under(Path("/proc/self/mountinfo").read_text(), directory):
        try:
            unmount(point)
        except SandboxError as exc:
            log.warning("%s", exc)
    for device in loops_backed_under(Path("/sys/block"), directory):
        # A slot's device is detached with its last unmount; only a crash between attach and mount
        # leaves one unmounted, and only then does this detach anything.
        subprocess.run(["losetup", "--detach", device], capture_output=True, timeout=COMMAND_TIMEOUT_S,
                       env={"PATH": SBIN_PATH, "LC_ALL": "C"})
    if not os.path.isdir(directory):
        return
    for entry in os.scandir(directory):
        try:
            if entry.is_dir(follow_symlinks=False):
                os.rmdir(entry.path)  # an empty mount point: a still-mounted one refuses (EBUSY), untouched
            else:
                os.unlink(entry.path)
        except OSError as exc:
            log.warning("could not remove %s: %s", entry.path, exc.strerror)
    try:
        os.rmdir(directory)
    except OSError as exc:
        log.warning("could not remove %s: %s", directory, exc.strerror)
