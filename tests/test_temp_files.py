"""The receiver's temp files: spare files made ahead of need, written unbuffered, write-back started early."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import wait_for
from scp import temp_files
from scp.temp_files import SpareFiles, TempFile


def test_spare_files_are_new_empty_distinct_files_in_the_directory(tmp_path: Path) -> None:
    spare = SpareFiles(tmp_path, keep=4)
    spare.start()
    wait_for(lambda: len(list(tmp_path.iterdir())) == 4, timeout=5, what="the pool to fill")
    taken = [spare.take() for _ in range(10)]  # more than the pool holds: the rest are made at once
    try:
        assert len({f.path for f in taken}) == 10
        for file in taken:
            assert Path(file.path).parent == tmp_path and Path(file.path).stat().st_size == 0
            assert os.fstat(file.fd).st_ino == Path(file.path).stat().st_ino  # the fd is that file
        wait_for(lambda: len(list(tmp_path.iterdir())) == 14, timeout=5, what="the pool to refill")
    finally:
        for file in taken:
            file.close()
        spare.close()
    remaining = sorted(p.name for p in tmp_path.iterdir())
    assert remaining == sorted(Path(f.path).name for f in taken)  # close() removed only the untaken ones


def test_take_works_without_the_filler_and_after_close(tmp_path: Path) -> None:
    spare = SpareFiles(tmp_path, keep=2)  # never started
    first = spare.take()
    spare.close()
    second = spare.take()
    for file in (first, second):
        file.write(b"x")
        file.close()
        assert Path(file.path).read_bytes() == b"x"


def test_the_filler_stops_quietly_when_the_directory_goes_away(tmp_path: Path) -> None:
    directory = tmp_path / "tmp"
    directory.mkdir()
    spare = SpareFiles(directory, keep=2)
    spare.start()
    wait_for(lambda: len(list(directory.iterdir())) == 2, timeout=5, what="the pool to fill")
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()
    made = [spare.take(), spare.take()]  # the two already open files, unlinked: still writable
    with pytest.raises(FileNotFoundError):
        spare.take()  # none ready, and none can be made: the receiver reports it
    for file in made:
        file.close()
    spare.close()


@pytest.mark.parametrize("writeback", [False, True])
def test_temp_file_writes_every_part_in_order(tmp_path: Path, writeback: bool) -> None:
    path = tmp_path / "f.dcm"
    file = TempFile(str(path), os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), writeback)
    parts = [b"meta", memoryview(os.urandom(200_000))[5:], bytearray(b"tail"), b""]
    file.write(parts[0], parts[1])
    file.write(parts[2])
    file.write(parts[3])
    assert file.size == sum(len(p) for p in parts)
    assert file.path == str(path) and os.fstat(file.fd).st_ino == path.stat().st_ino
    file.close()
    file.close()  # twice is harmless
    assert path.read_bytes() == b"".join(bytes(p) for p in parts)


def test_write_back_is_available_here() -> None:
    """The benchmark's ct figure counts on it (Linux); elsewhere TempFile still works without it."""
    if not os.uname().sysname == "Linux":
        pytest.skip("sync_file_range is Linux only")
    assert temp_files._sync_file_range is not None


@pytest.mark.parametrize("writeback", [False, True])
def test_write_back_is_asked_for_every_large_stretch_written(tmp_path: Path, writeback: bool) -> None:
    """With write-back on, each 64 KB or more written is handed to the kernel at once (a hint: the
    store's fsync still makes it durable); small writes wait until 64 KB have piled up."""
    path = tmp_path / "f.dcm"
    file = TempFile(str(path), os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), writeback=writeback)
    file.write(os.urandom(1000))
    assert file._started == 0
    for _ in range(4):
        file.write(os.urandom(128 * 1024))
    assert file._started == (file.size if writeback else 0)
    file.write(os.urandom(1000))
    assert file._started == (file.size - 1000 if writeback else 0)
    file.written()  # the last bytes are in: the tail goes to write-back too
    assert file._started == (file.size if writeback else 0)
    os.fsync(file.fd)
    file.close()
    assert path.stat().st_size == 4 * 128 * 1024 + 2000
