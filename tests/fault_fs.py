"""Small, real filesystems for disk-full tests: a size-limited tmpfs, else a loop-mounted ext4 image."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def _unmount(mount_point: Path) -> None:
    if _run("umount", str(mount_point)).returncode != 0:
        _run("umount", "-l", str(mount_point))  # a straggler still holds a file: detach anyway


@contextmanager
def small_filesystem(mount_point: Path, size_kb: int) -> Iterator[str]:
    """Mount a filesystem of about ``size_kb`` KiB at ``mount_point``; yields its type.

    Tries ``mount -t tmpfs -o size=…`` first, then an ext4 image on a loop device. Skips the test,
    saying why, only when neither can be mounted (no root / CAP_SYS_ADMIN, no loop devices).
    """
    mount_point.mkdir(parents=True, exist_ok=True)
    tmpfs = _run("mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", str(mount_point))
    if tmpfs.returncode == 0:
        try:
            yield "tmpfs"
        finally:
            _unmount(mount_point)
        return
    image = mount_point.parent / f"{mount_point.name}.ext4"
    problems = [f"tmpfs: {tmpfs.stderr.strip() or tmpfs.returncode}"]
    if shutil.which("mkfs.ext4") is None:
        pytest.skip(f"cannot mount a small filesystem ({problems[0]}; mkfs.ext4 not installed)")
    with open(image, "wb") as handle:
        handle.truncate(size_kb * 1024)
    made = _run("mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", str(image))
    loop = _run("mount", "-o", "loop", str(image), str(mount_point)) if made.returncode == 0 else made
    if loop.returncode != 0:
        image.unlink(missing_ok=True)
        problems.append(f"loop ext4: {loop.stderr.strip() or loop.returncode}")
        pytest.skip(f"cannot mount a small filesystem ({'; '.join(problems)}); needs root or CAP_SYS_ADMIN")
    try:
        yield "ext4"
    finally:
        _unmount(mount_point)
        image.unlink(missing_ok=True)


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fill(path: Path, leave: int) -> Path:
    """Write a ballast file at ``path`` so that about ``leave`` bytes stay free on its filesystem."""
    size = (free_bytes(path.parent) - leave) // 4096 * 4096  # whole pages: between leave and leave + 4 KiB stay free
    assert size > 0, f"only {free_bytes(path.parent)} bytes free, cannot leave {leave}"
    with open(path, "wb") as handle:
        handle.write(b"\xa5" * size)
        handle.flush()
        os.fsync(handle.fileno())
    return path
