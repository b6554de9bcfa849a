"""One writing command per output folder: the lock, its message, and its release when the holder dies."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from medseg.errors import DataError
from medseg.locking import LOCK_FILE, folder_lock, holder_of

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows: no lock is taken there")


def test_a_held_folder_is_refused_with_its_holder_named_and_free_again_after(tmp_path):
    with folder_lock(tmp_path, "train"):
        with pytest.raises(DataError, match=r"medseg train \(process \d+ on .+, since .+\) is writing into this "
                                            r"folder; wait for it to end, or choose another output folder"):
            with folder_lock(tmp_path, "infer"):
                pass
    with folder_lock(tmp_path, "infer"):  # released at the end of the block
        assert "medseg infer" in (tmp_path / LOCK_FILE).read_text()
    assert not (tmp_path / LOCK_FILE).exists()  # and removed
    with pytest.raises(RuntimeError), folder_lock(tmp_path, "train"):
        raise RuntimeError("the command failed")
    with folder_lock(tmp_path, "train"):  # and released when the command failed
        pass


def test_who_is_writing_into_a_folder_is_told_without_taking_its_lock(tmp_path):
    assert holder_of(tmp_path) is None
    with folder_lock(tmp_path, "train"):
        assert holder_of(tmp_path).startswith("medseg train (process ")
        assert holder_of(tmp_path).startswith("medseg train")  # asking twice takes nothing from the holder
    (tmp_path / LOCK_FILE).write_text("{}")  # a killed holder's file: no one holds it
    assert holder_of(tmp_path) is None


def test_a_killed_holder_frees_the_folder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from medseg.locking import folder_lock
            with folder_lock({str(tmp_path)!r}, "train"):
                print("held", flush=True)
                time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DataError, match=rf"process {holder.pid} "), folder_lock(tmp_path, "infer"):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert (tmp_path / LOCK_FILE).exists()  # a killed holder leaves the file, but not the lock
    with folder_lock(tmp_path, "infer"):
        pass
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_taken_on_a_file_just_removed_is_taken_again_on_the_new_one(tmp_path, monkeypatch):
    import fcntl

    real, calls = fcntl.flock, []

    def racing(fd, operation):  # the previous holder removes the file between our open and our lock
        real(fd, operation)
        calls.append(operation)
        if len(calls) == 1:
            (tmp_path / LOCK_FILE).unlink()

    monkeypatch.setattr(fcntl, "flock", racing)
    with folder_lock(tmp_path, "train"):
        assert len(calls) == 2 and "medseg train" in (tmp_path / LOCK_FILE).read_text()


def test_a_filesystem_without_locks_or_a_foreign_lock_file_does_not_stop_the_command(tmp_path, monkeypatch):
    import fcntl
    import os

    def no_locks(fd, operation):
        raise OSError(37, "No locks available")

    with monkeypatch.context() as m:
        m.setattr(fcntl, "flock", no_locks)
        with folder_lock(tmp_path, "infer"):  # goes on without a lock
            pass
    (tmp_path / LOCK_FILE).write_text("{}")  # another user's, left by a killed command: not writable
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(LOCK_FILE) and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    with monkeypatch.context() as m:
        m.setattr(os, "open", read_only)
        with folder_lock(tmp_path, "train"):  # locked all the same: a lock needs no write access
            with pytest.raises(DataError, match="is writing into this folder"), folder_lock(tmp_path, "infer"):
                pass
