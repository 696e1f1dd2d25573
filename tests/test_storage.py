import os

import pyarrow.fs as pafs
import pytest

from ood_core import storage


def test_resolve_plain_relative_and_home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("a/b.bin")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path / "a" / "b.bin")
    monkeypatch.setenv("HOME", str(tmp_path))
    _, path = storage.resolve("~/x.bin")
    assert path == str(tmp_path / "x.bin")


def test_resolve_uri_and_make_parents(tmp_path):
    target = tmp_path / "deep" / "er" / "f.bin"
    fs, path = storage.resolve(f"file://{target}", make_parents=True)
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(target)
    assert (tmp_path / "deep" / "er").is_dir()
    with pytest.raises(ValueError):
        storage.resolve("")


def test_exists_read_remove(tmp_path):
    p = tmp_path / "f.bin"
    assert not storage.exists(p)
    p.write_bytes(b"abc")
    assert storage.exists(p) and storage.exists(f"file://{p}")
    assert not storage.exists(tmp_path)  # a directory is not a file
    assert storage.read_bytes(p) == b"abc"
    storage.remove(p)
    assert not p.exists()
    storage.remove(p)  # missing_ok
    with pytest.raises(FileNotFoundError):
        storage.remove(p, missing_ok=False)


def test_atomic_output_success_creates_parents(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with storage.atomic_output(target) as f:
        f.write(b"hello")
        assert not target.exists()  # invisible until the block ends
    assert target.read_bytes() == b"hello"
    assert os.listdir(target.parent) == ["out.bin"]


def test_atomic_output_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with storage.atomic_output(target) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    target.write_bytes(b"old")
    with pytest.raises(KeyError):
        with storage.atomic_output(str(target)) as f:
            f.write(b"new")
            raise KeyError("x")
    assert target.read_bytes() == b"old"  # the existing file is untouched
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_output_replaces_existing(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with storage.atomic_output(f"file://{target}") as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"


def test_outputs_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    """``remove_abandoned_outputs(uri, dead_writers_only=True)``: a temporary output names its writer
    (``<pid>@<host>``); only a writer of this machine that no longer runs is known to be dead. A live writer's
    output (a concurrent sweep writing the same key), another machine's and an unnamed one stay."""
    import socket
    import subprocess
    import sys

    from ood_core.storage import AtomicOutput, remove_abandoned_outputs

    target = tmp_path / "ckpt.pt"
    live = AtomicOutput(str(target))
    live.open().write(b"in progress")
    assert f".tmp-{os.getpid()}@{socket.gethostname()}-" in live.tmp_path
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    host = socket.gethostname()
    names = {"dead": f"ckpt.pt.tmp-{dead_pid}@{host}-{'a' * 32}", "other host": f"ckpt.pt.tmp-{dead_pid}@elsewhere-{'b' * 32}",
             "unnamed": f"ckpt.pt.tmp-{'c' * 32}", "other key": f"other.pt.tmp-{dead_pid}@{host}-{'d' * 32}"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    assert remove_abandoned_outputs(str(target), dead_writers_only=True) == 1
    left = {p.name for p in tmp_path.iterdir()}
    assert names["dead"] not in left
    assert {names["other host"], names["unnamed"], names["other key"], os.path.basename(live.tmp_path)} <= left
    live.commit()
    assert target.read_bytes() == b"in progress"
    assert remove_abandoned_outputs(str(target)) == 2  # without the flag: every output of this key
