"""Emptying the scratch dirs. PID 1 removes the entries right in them (`remove_top_entries`): unlink and
rmdir never follow a symlink. Anything deeper is removed by the template's cleaner as the sandbox uid
(`remove_contents`), so that no path a task made can make root act elsewhere."""

import os
import shutil

from runner_image.sandbox.config import SCRATCH_DIRS


def remove_top_entries() -> bool:
    """Unlink the files and remove the empty dirs right in each scratch dir; True if anything is left."""
    leftovers = False
    for top in SCRATCH_DIRS:
        for entry in os.scandir(top):
            try:
                (os.rmdir if entry.is_dir(follow_symlinks=False) else os.unlink)(entry.path)
            except OSError:
                leftovers = True
    return leftovers


def remove_contents(top: str) -> None:
    """As the sandbox uid: delete everything inside `top`, never following symlinks."""
    for entry in os.scandir(top):
        try:
            if not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)
                continue
            # The task may have left dirs without rwx for their owner: rmtree could not empty those.
            os.chmod(entry.path, 0o700)
            for path, dirs, _ in os.walk(entry.path):
                for sub in (os.path.join(path, name) for name in dirs):
                    if not os.path.islink(sub):
                        os.chmod(sub, 0o700)
            shutil.rmtree(entry.path)
        except Exception:
            pass  # verification reports whatever could not go


def remove_start_up_leftovers() -> None:
    """At start-up, before the template forks: what the preloaded imports left (no task has run yet, so
    nothing there is untrusted, and PID 1 removes it itself)."""
    for top in SCRATCH_DIRS:
        for entry in os.scandir(top):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
