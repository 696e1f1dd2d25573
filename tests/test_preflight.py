"""User errors before compute, as one line with exit 2: storage that cannot be written, a tracking store that
cannot be reached, errors raised inside Ray tasks, unreadable images (issue 11, point 1).

Each test failed on the code before it: the storage and tracking problems passed ``validate`` and surfaced
after Ray had started and a backbone had trained (or after minutes of MLflow retries), as tracebacks with
exit 1; an error raised in a Ray task reached the command line as ``RayTaskError(...)``, which it did not
recognise.
"""
import contextlib
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import yaml

from orchestrator import cli
from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "sweeps" / "quickstart.yaml"


def _config(tmp_path: Path, **top) -> Path:
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["storage"] = str(tmp_path / "store")
    raw["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw.update(top)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _one_line(err: str, expected_start: str) -> None:
    assert err.startswith("error: " + expected_start), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


@contextlib.contextmanager
def _read_only_folder(tmp_path: Path):
    """A folder that exists and cannot be written, also by root: chmod for a user; for root the immutable
    attribute (chattr +i) where the file system allows it, else /proc (exists, nothing can be created there)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        try:
            yield str(folder)
        finally:
            folder.chmod(0o755)
        return
    folder = tmp_path / "immutable"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        try:
            yield str(folder)
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        return
    if not Path("/proc/self").is_dir():
        pytest.skip("no way to make a read-only folder as root here")
    yield "/proc"


# --------------------------------------------------------------------------------------------- storage


def test_storage_that_is_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, err = _run(capsys, "validate", str(_config(tmp_path, storage=str(tmp_path / "afile"))))
    assert code == 2
    _one_line(err, f"storage: {tmp_path / 'afile'} is a file, not a folder")


def test_storage_under_a_file_or_proc_cannot_be_created(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, err = _run(capsys, "validate", str(_config(tmp_path, storage=str(tmp_path / "afile" / "store"))))
    assert code == 2
    _one_line(err, f"storage: cannot create the folder {tmp_path / 'afile' / 'store'} (Not a directory)")
    if Path("/proc/self").is_dir():
        code, err = _run(capsys, "validate", str(_config(tmp_path, storage="/proc/ood-sweep-store")))
        assert code == 2
        _one_line(err, "storage: cannot create the folder /proc/ood-sweep-store")


def test_read_only_storage(tmp_path, capsys):
    with _read_only_folder(tmp_path) as folder:
        code, err = _run(capsys, "validate", str(_config(tmp_path, storage=folder)))
        assert code == 2
        _one_line(err, f"storage: cannot write to {folder} (")
        # one level deeper: the folder cannot even be created
        if folder != "/proc":
            code, err = _run(capsys, "validate", str(_config(tmp_path, storage=f"{folder}/store")))
            assert code == 2
            _one_line(err, f"storage: cannot create the folder {folder}/store (")


def test_sweep_refuses_bad_storage_before_any_work(tmp_path, capsys):
    ray_before = _ray_running()
    (tmp_path / "afile").write_text("x")
    cfg = _config(tmp_path, storage=str(tmp_path / "afile" / "store"))
    code, err = _run(capsys, "sweep", str(cfg))
    assert code == 2
    _one_line(err, "storage: cannot create the folder")
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow work
    assert _ray_running() == ray_before  # no Ray started


def test_validate_writes_storage_and_leaves_nothing_behind(tmp_path, capsys):
    cfg = _config(tmp_path, storage=str(tmp_path / "a" / "b" / "store"))
    code, err = _run(capsys, "validate", str(cfg))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]  # no store, no probe, no mlflow.db


def test_storage_probe_on_s3(tmp_path, monkeypatch):
    pytest.importorskip("moto")
    import s3_server
    from orchestrator.errors import UserError
    from orchestrator.preflight import check_storage

    server, root = s3_server.start()
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        check_storage(f"{root}/preflight-test/store")  # writable: passes, and leaves no probe object behind
        from ood_core import storage
        import pyarrow.fs as pafs

        fs, path = storage.resolve(f"{root}/preflight-test")  # the bucket is shared by the S3 tests
        left = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        assert [i.path for i in left if i.type == pafs.FileType.File] == []
        with pytest.raises(UserError, match=r"^storage: cannot write to s3://no-such-bucket/store \("):
            check_storage("s3://no-such-bucket/store")
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------- tracking


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_fails_in_seconds(tmp_path, capsys):
    port = _closed_port()
    cfg = _config(tmp_path, tracking_uri=f"http://127.0.0.1:{port}")
    ray_before = _ray_running()
    start = time.perf_counter()
    code, err = _run(capsys, "sweep", str(cfg))
    elapsed = time.perf_counter() - start
    assert code == 2
    _one_line(err, f"tracking_uri: cannot reach the MLflow tracking server at http://127.0.0.1:{port} "
                   "(Connection refused)")
    assert elapsed < 15, f"took {elapsed:.1f} s"
    assert _ray_running() == ray_before and not (tmp_path / "store").exists()
    for command in ("validate", "report"):
        start = time.perf_counter()
        code, err = _run(capsys, command, str(cfg))
        assert code == 2 and time.perf_counter() - start < 15, command
        _one_line(err, "tracking_uri: cannot reach the MLflow tracking server")


def test_tracking_uri_from_the_environment_is_named(tmp_path, capsys, monkeypatch):
    port = _closed_port()
    raw = yaml.safe_load(_config(tmp_path).read_text())
    del raw["tracking_uri"]
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    code, err = _run(capsys, "validate", str(tmp_path / "sweep.yaml"))
    assert code == 2
    _one_line(err, "tracking_uri (from MLFLOW_TRACKING_URI): cannot reach the MLflow tracking server")


def test_local_tracking_stores(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"\x00" * 4096)
    for uri, expected in [
        (f"sqlite:///{damaged}", f"tracking_uri: {damaged} is not an SQLite database"),
        (f"sqlite:///{tmp_path / 'afile' / 'mlflow.db'}", f"tracking_uri: {tmp_path / 'afile'} is a file, not a folder"),
        (f"file://{tmp_path / 'afile' / 'mlruns'}", f"tracking_uri: cannot create the folder {tmp_path / 'afile' / 'mlruns'}"),
    ]:
        code, err = _run(capsys, "validate", str(_config(tmp_path, tracking_uri=uri)))
        assert code == 2, uri
        _one_line(err, expected)
    code, err = _run(capsys, "validate", str(_config(tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'new' / 'm.db'}")))
    assert code == 0, err
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------------------------- images


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG file whose header declares ``width`` x ``height`` gray pixels (the pixel data is not there)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def _image_set(paths):
    import numpy as np

    from ood_core.datasets.base import FileImageDataset, InputFormat

    return FileImageDataset(paths, np.full(len(paths), -1), InputFormat(1, 8, (0.5,), (0.5,)), None, "images")


def test_image_errors_name_the_file(tmp_path):
    from ood_core.datasets.base import ImageReadError
    from ood_core.errors import UserCausedError

    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_claiming(30000, 30000))  # 9e8 pixels: PIL refuses it as a decompression bomb
    damaged = tmp_path / "damaged.jpg"
    damaged.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    for path, reason in [(huge, "too large to decode safely"), (damaged, ""), (text, "cannot identify image file")]:
        with pytest.raises(ImageReadError) as info:
            _image_set([path])[0]
        assert str(info.value).startswith(f"cannot read image {path}: {reason}"), str(info.value)
        assert isinstance(info.value, UserCausedError) and isinstance(info.value, OSError)


def test_image_error_in_a_dataloader_worker_is_still_one_line(tmp_path):
    """torch re-raises a worker's error as ``cls("Caught ... Original Traceback ...")``: still the user error,
    reported as its original line."""
    import torch

    from orchestrator.errors import one_line, user_error_of

    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_claiming(30000, 30000))
    loader = torch.utils.data.DataLoader(_image_set([huge]), batch_size=1, num_workers=1)
    with pytest.raises(Exception) as info:
        next(iter(loader))
    user = user_error_of(info.value)
    assert user is not None, repr(info.value)
    assert one_line(user).startswith(f"cannot read image {huge}: too large to decode safely"), one_line(user)


def test_a_diverging_training_is_a_user_error():
    """NaN loss (a learning rate too high, data with NaN): the recognisable TrainingDivergedError, still a
    FloatingPointError for old callers."""
    import torch
    from torch.utils.data import TensorDataset

    from ood_core.errors import TrainingDivergedError
    from ood_core.models import build_model
    from ood_core.training import make_train_config, train_classifier
    from orchestrator.errors import user_error_of

    data = TensorDataset(torch.full((16, 1, 8, 8), float("nan")), torch.arange(16) % 2)
    model = build_model("small_cnn", num_classes=2, in_channels=1, image_size=8, seed=0, load_weights=False)
    with pytest.raises(TrainingDivergedError, match="training loss is nan in epoch") as info:
        train_classifier(model, data, None, make_train_config(epochs=1, batch_size=8, amp=False), seed=0, device="cpu")
    assert isinstance(info.value, FloatingPointError) and user_error_of(info.value) is info.value


# --------------------------------------------------------------------------------------------- Ray tasks


def test_errors_raised_in_ray_tasks_are_reported_like_local_ones(ray_session, tmp_path, capsys, monkeypatch):
    """A user-caused error raised in a Ray task gives the same line and exit code as raised locally; an internal
    fault raised in a task keeps its traceback."""
    ray = ray_session
    bad_checkpoint = tmp_path / "bad.pt"
    bad_checkpoint.write_bytes(b"this is not a checkpoint")
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_claiming(30000, 30000))

    def load_checkpoint():
        from ood_core.checkpoints import load_checkpoint

        return load_checkpoint(str(bad_checkpoint))

    def read_image():  # self-contained: a Ray worker cannot import this test module
        import numpy as np

        from ood_core.datasets.base import FileImageDataset, InputFormat

        return FileImageDataset([huge], np.full(1, -1), InputFormat(1, 8, (0.5,), (0.5,)), None, "images")[0]

    def diverge():
        from ood_core.errors import TrainingDivergedError

        raise TrainingDivergedError("train_classifier: training loss is nan in epoch 0 (lr=10); lower the learning rate")

    def missing_data():
        from ood_core.data import check_available

        check_available("image_folder", split="test", path=str(tmp_path / "no-such-folder"))

    def bad_param():
        from ood_core.data import load_dataset
        from ood_core.datasets.base import InputFormat

        load_dataset("gaussian_noise", split="test", fmt=InputFormat(1, 8, (0.5,), (0.5,)), seed=0, n=-5)

    for fn in (load_checkpoint, read_image, diverge, missing_data, bad_param):
        monkeypatch.setitem(cli.COMMANDS, "validate", lambda args, fn=fn: fn())
        local_code, local_err = _run(capsys, "validate", "x.yaml")
        task = ray.remote(fn).options(max_retries=0)
        monkeypatch.setitem(cli.COMMANDS, "validate", lambda args, task=task: ray.get(task.remote()))
        code, err = _run(capsys, "validate", "x.yaml")
        assert (code, err) == (local_code, local_err) == (2, local_err), (fn.__name__, err)
        _one_line(err, "")

    def internal_fault():
        return 1 / 0

    task = ray.remote(internal_fault).options(max_retries=0)
    monkeypatch.setitem(cli.COMMANDS, "validate", lambda args: ray.get(task.remote()))
    with pytest.raises(ZeroDivisionError):
        main(["validate", "x.yaml"])


def test_sweep_with_a_bad_checkpoint_exits_2_with_one_line(tmp_path):
    """End to end: the user's checkpoint is read in the training task (a Ray worker); the CLI unwraps it."""
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"garbage, not a torch file")
    raw = yaml.safe_load(_config(tmp_path).read_text())
    raw["backbones"][0]["checkpoint"] = str(bad)
    raw["detectors"] = raw["detectors"][:1]
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(cfg)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors[-1].startswith("error: "), proc.stderr[-3000:]
    assert str(bad) in errors[-1]
    assert "Traceback" not in proc.stderr and "RayTaskError" not in proc.stderr, proc.stderr[-3000:]
