"""Real data-set loaders on tiny files written in the real on-disk formats (never downloading)."""
import gzip
import inspect

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fake_data import (write_cifar10, write_cifar100, write_images, write_mnist, write_svhn,
                       write_tinyimagenet)
from ood_core import data
from ood_core.data import (DATASETS, ArrayImageDataset, DataMissingError, FileImageDataset, InputFormat,
                           check_available, load_dataset, num_classes)
from ood_core.datasets import arrays, folders

RAW3 = InputFormat(3, 32, (0.0,) * 3, (1.0,) * 3)
RAW1 = InputFormat(1, 28, (0.0,), (1.0,))
REAL = ["cifar10", "cifar100", "svhn", "mnist", "fashionmnist", "textures", "places365", "tinyimagenet",
        "lsun_crop", "lsun_resize", "isun"]


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch, tmp_path):
    """Any download attempt fails the test; the default root is an empty folder."""
    def boom(*a, **k):
        raise AssertionError("a test tried to download")

    for src in arrays.SOURCES.values():
        monkeypatch.setattr(src, "download", boom)
    monkeypatch.setattr(folders, "DOWNLOADERS", {k: boom for k in folders.DOWNLOADERS})
    monkeypatch.setenv("OOD_SWEEP_DATA", str(tmp_path / "empty-default-root"))
    monkeypatch.setattr(arrays, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")


def _raw(ds, i):
    """Pixels of item i in [0, 255] (datasets built with a raw format)."""
    return (ds[i][0] * 255).round().to(torch.uint8).numpy()


def test_registry_has_the_benchmark_sets():
    for name in REAL + ["image_folder", "digits", "gaussian_noise", "uniform_noise"]:
        assert name in DATASETS, name
    for name in REAL:
        params = inspect.signature(DATASETS[name].build).parameters
        assert {"root", "download", "max_samples"} <= set(params), name
        assert DATASETS[name].check is not None
    assert DATASETS["cifar10"].num_classes == 10 and DATASETS["cifar100"].num_classes == 100
    assert DATASETS["cifar10"].default_format.mean == (0.4914, 0.4822, 0.4465)
    assert num_classes("cifar100") == 100 and num_classes("cifar10", classes=[1, 2]) == 2
    assert num_classes("textures") is None and num_classes("tinyimagenet") == 200
    assert issubclass(DataMissingError, FileNotFoundError)


def test_cifar10_openood_splits(tmp_path):
    written = write_cifar10(tmp_path, per_batch=20, n_test=50)
    train = load_dataset("cifar10", split="train", fmt=RAW3, seed=0, root=str(tmp_path))
    val = load_dataset("cifar10", split="val", fmt=RAW3, seed=0, root=str(tmp_path), val_size=10)
    test = load_dataset("cifar10", split="test", fmt=RAW3, seed=0, root=str(tmp_path), val_size=10)
    assert isinstance(train, ArrayImageDataset) and train.num_classes == 10
    assert (len(train), len(val), len(test)) == (100, 10, 40)
    assert train.images.dtype == np.uint8  # lazy: raw bytes kept, converted on access
    np.testing.assert_array_equal(_raw(train, 37), written["train_x"][37])
    assert int(train[37][1]) == written["train_y"][37]
    # val + test partition the test batch; val is stratified (1 per class)
    assert not set(val.indices) & set(test.indices) and len(set(val.indices) | set(test.indices)) == 50
    assert sorted(val.labels.tolist()) == list(range(10))
    np.testing.assert_array_equal(_raw(val, 3), written["test_x"][val.indices[3]])
    # seeded: same seed same split, another seed another split
    again = load_dataset("cifar10", split="val", fmt=RAW3, seed=0, root=str(tmp_path), val_size=10)
    other = load_dataset("cifar10", split="val", fmt=RAW3, seed=1, root=str(tmp_path), val_size=10)
    assert list(again.indices) == list(val.indices) and list(other.indices) != list(val.indices)
    # val_size 0: the whole test batch; a hold-out as large as the test batch is refused
    assert len(load_dataset("cifar10", split="test", fmt=RAW3, seed=0, root=str(tmp_path), val_size=0)) == 50
    with pytest.raises(ValueError, match="val_size 1000"):
        load_dataset("cifar10", split="test", fmt=RAW3, seed=0, root=str(tmp_path))


def test_batched_access_matches_items_and_normalises(tmp_path):
    write_cifar10(tmp_path)
    fmt = DATASETS["cifar10"].default_format
    ds = load_dataset("cifar10", split="test", fmt=fmt, seed=0, root=str(tmp_path), val_size=10)
    x, y = next(iter(DataLoader(ds, batch_size=7)))  # goes through __getitems__
    assert x.shape == (7, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    for i in range(7):
        assert torch.allclose(x[i], ds[i][0]) and int(y[i]) == int(ds[i][1])
    raw = torch.from_numpy(ds.images[ds.indices[0]].copy()).float() / 255
    expect = (raw - torch.tensor(fmt.mean).view(3, 1, 1)) / torch.tensor(fmt.std).view(3, 1, 1)
    assert torch.allclose(ds[0][0], expect, atol=1e-6)
    # converted to another ID format: gray, 28x28
    gray = load_dataset("cifar10", split="test", fmt=InputFormat(1, 28, (0.5,), (0.5,)), seed=0, root=str(tmp_path),
                        val_size=10)
    assert gray[0][0].shape == (1, 28, 28)


def test_cifar100_classes_and_subsampling(tmp_path):
    write_cifar100(tmp_path)
    ds = load_dataset("cifar100", split="train", fmt=RAW3, seed=0, root=str(tmp_path), classes=[5, 3])
    assert ds.num_classes == 2 and set(ds.labels.tolist()) == {0, 1} and len(ds) == 4
    sub = load_dataset("cifar100", split="test", fmt=RAW3, seed=0, root=str(tmp_path), val_size=0, max_samples=30)
    sub2 = load_dataset("cifar100", split="test", fmt=RAW3, seed=0, root=str(tmp_path), val_size=0, max_samples=30)
    assert len(sub) == 30 and list(sub.indices) == list(sub2.indices) and list(sub.indices) == sorted(sub.indices)
    with pytest.raises(ValueError, match="classes"):
        load_dataset("cifar100", split="train", fmt=RAW3, seed=0, root=str(tmp_path), classes=[100])


def test_svhn_mat(tmp_path):
    written = write_svhn(tmp_path)
    train = load_dataset("svhn", split="train", fmt=RAW3, seed=0, root=str(tmp_path))
    assert len(train) == 30 and train.labels.tolist() == written["train_y"].tolist()  # 10 -> 0
    np.testing.assert_array_equal(_raw(train, 4), written["train_x"][4])
    test = load_dataset("svhn", split="test", fmt=RAW3, seed=0, root=str(tmp_path), val_size=0)
    assert len(test) == 40


def test_mnist_idx_gz_and_pooling(tmp_path):
    written = write_mnist(tmp_path / "MNIST" / "raw", gz=True)
    train = load_dataset("mnist", split="train", fmt=RAW1, seed=0, root=str(tmp_path))
    np.testing.assert_array_equal(_raw(train, 5)[0], written["train_x"][5])
    pooled = load_dataset("mnist", split="test", fmt=RAW1, seed=0, root=str(tmp_path), val_size=0, test_pool="all")
    assert len(pooled) == 70
    with pytest.raises(ValueError, match="train split"):
        load_dataset("mnist", split="train", fmt=RAW1, seed=0, root=str(tmp_path), test_pool="all")
    rgb = load_dataset("mnist", split="test", fmt=RAW3, seed=0, root=str(tmp_path), val_size=5)
    x = rgb[0][0]
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[1])
    with pytest.raises(ValueError, match="idx"):
        arrays.read_idx(_corrupt(tmp_path / "bad-idx"))


def _corrupt(path):
    path.write_bytes(gzip.compress(b"\x01\x02\x03\x04garbage"))
    return path


def test_fashionmnist_falls_back_to_debian_folder(tmp_path, monkeypatch):
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    written = write_mnist(debian, gz=True, seed=5)
    monkeypatch.setattr(arrays, "DEBIAN_FASHION_MNIST", debian)
    root = tmp_path / "root"  # empty data root
    check_available("fashionmnist", split="train", root=str(root))
    ds = load_dataset("fashionmnist", split="train", fmt=RAW1, seed=0, root=str(root))
    np.testing.assert_array_equal(_raw(ds, 2)[0], written["train_x"][2])
    # the data root wins when it has the files
    own = write_mnist(root / "FashionMNIST" / "raw", gz=False, seed=6)
    ds = load_dataset("fashionmnist", split="train", fmt=RAW1, seed=0, root=str(root))
    np.testing.assert_array_equal(_raw(ds, 2)[0], own["train_x"][2])


def test_missing_data_errors_name_set_path_and_remedy(tmp_path):
    root = tmp_path / "nothing"
    with pytest.raises(DataMissingError) as err:
        check_available("cifar10", split="train", root=str(root))
    msg = str(err.value)
    assert "'cifar10'" in msg and str(root / "cifar-10-batches-py") in msg and "download: true" in msg
    assert "\n" not in msg
    with pytest.raises(DataMissingError, match="tinyimagenet.*tiny-imagenet-200"):
        check_available("tinyimagenet", split="test", root=str(root))
    with pytest.raises(DataMissingError, match="torchvision cannot download it.*LSUN"):
        check_available("lsun_crop", split="test", root=str(root), download=True)
    with pytest.raises(DataMissingError):  # load_dataset fails the same way
        load_dataset("svhn", split="test", fmt=RAW3, seed=0, root=str(root))
    # default root from the environment
    with pytest.raises(DataMissingError, match="empty-default-root"):
        check_available("places365", split="test")
    # downloadable + download: true passes without fetching when asked not to fetch
    check_available("cifar10", split="train", root=str(root), download=True, fetch=False)
    for name in ("digits", "gaussian_noise"):
        check_available(name, split="test")
    with pytest.raises(ValueError, match="unknown parameter"):
        check_available("cifar10", split="train", colour=1)


def test_download_is_delegated_and_failure_is_clear(tmp_path, monkeypatch):
    root = tmp_path / "r"
    calls = []

    def fake_download(r):
        calls.append(r)
        write_cifar10(r)

    monkeypatch.setattr(arrays.SOURCES["cifar10"], "download", fake_download)
    check_available("cifar10", split="train", root=str(root), download=True)
    assert calls == [root] and len(load_dataset("cifar10", split="train", fmt=RAW3, seed=0, root=str(root))) == 100
    check_available("cifar10", split="train", root=str(root), download=True)  # present: no second call
    assert len(calls) == 1

    def offline(r):
        raise OSError("Name or service not known")

    monkeypatch.setattr(arrays.SOURCES["cifar100"], "download", offline)
    with pytest.raises(DataMissingError, match="cifar100.*download into .* failed .*Name or service not known"):
        check_available("cifar100", split="test", root=str(root), download=True)


def test_ood_folder_sets(tmp_path):
    paths = write_images(tmp_path / "dtd" / "dtd" / "images" / "banded", 8, size=(60, 40), seed=1, ext=".jpg")
    write_images(tmp_path / "dtd" / "dtd" / "images" / "zigzag", 4, size=(30, 30), seed=2, mode="L")
    ds = load_dataset("textures", split="test", fmt=RAW3, seed=0, root=str(tmp_path))
    assert isinstance(ds, FileImageDataset) and len(ds) == 12 and (ds.labels == -1).all()
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and int(y) == -1 and 0 <= x.min() and x.max() <= 1
    gray = next(i for i, p in enumerate(ds.paths) if "zigzag" in str(p))
    assert torch.equal(ds[gray][0][0], ds[gray][0][2])  # gray images repeated to RGB
    # centre crop + resize of a non-square image, as torchvision Resize + CenterCrop
    from PIL import Image

    with Image.open(paths[0]) as im:
        ref = np.asarray(im.convert("RGB").crop((10, 0, 50, 40)).resize((32, 32), Image.BILINEAR))
    np.testing.assert_array_equal(_raw(ds, 0), ref.transpose(2, 0, 1))
    val = load_dataset("textures", split="val", fmt=RAW3, seed=0, root=str(tmp_path), val_size=3)
    test = load_dataset("textures", split="test", fmt=RAW3, seed=0, root=str(tmp_path), val_size=3)
    assert len(val) == 3 and len(test) == 9 and not set(val.paths) & set(test.paths)
    with pytest.raises(ValueError, match="no train split"):
        load_dataset("textures", split="train", fmt=RAW3, seed=0, root=str(tmp_path))
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("textures", split="val", fmt=RAW3, seed=0, root=str(tmp_path))
    write_images(tmp_path / "places365" / "val_256", 4, size=(64, 64), seed=3, ext=".jpg")
    write_images(tmp_path / "LSUN" / "test", 3, size=(36, 36), seed=4, ext=".jpg")
    write_images(tmp_path / "LSUN_resize" / "test", 3, size=(32, 32), seed=5, ext=".jpg")
    write_images(tmp_path / "iSUN" / "iSUN_patches", 2, size=(32, 32), seed=6, ext=".jpeg")
    sizes = {n: len(load_dataset(n, split="test", fmt=RAW1, seed=0, root=str(tmp_path), max_samples=3))
             for n in ("places365", "lsun_crop", "lsun_resize", "isun")}
    assert sizes == {"places365": 3, "lsun_crop": 3, "lsun_resize": 3, "isun": 2}


def test_tinyimagenet_val_from_train_disjoint_from_test(tmp_path):
    write_tinyimagenet(tmp_path, per_class=6, n_val=9)
    kw = dict(fmt=RAW3, seed=0, root=str(tmp_path), val_size=6)
    train, val, test = (load_dataset("tinyimagenet", split=s, **kw) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (12, 6, 9) and train.num_classes == 3
    assert sorted(val.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert not set(val.paths) & set(train.paths)
    assert all("/train/" in str(p) for p in val.paths) and all("/val/" in str(p) for p in test.paths)
    assert test.labels.tolist() == [i % 3 for i in range(9)]  # from val_annotations.txt
    assert test[0][0].shape == (3, 32, 32)
    ex = load_dataset("tinyimagenet", split="test", **dict(kw, exclude_wnids=["n02"]))
    assert len(ex) == 6 and ex.num_classes == 2 and set(ex.labels.tolist()) == {0, 1}
    assert num_classes("tinyimagenet", exclude_wnids=["n02"]) == 199


def test_image_folder_layouts(tmp_path):
    for k, cls in enumerate(("cat", "dog")):
        write_images(tmp_path / "classes" / cls, 10, seed=k)
    ds = load_dataset("image_folder", split="val", fmt=RAW3, seed=0, path=str(tmp_path / "classes"),
                      fractions=[0.6, 0.2, 0.2])
    assert len(ds) == 4 and sorted(ds.labels.tolist()) == [0, 0, 1, 1] and ds.num_classes == 2
    parts = [set(load_dataset("image_folder", split=s, fmt=RAW3, seed=0, path=str(tmp_path / "classes"),
                              fractions=[0.6, 0.2, 0.2]).paths) for s in data.SPLITS]
    assert sum(map(len, parts)) == 20 and len(set.union(*parts)) == 20
    assert num_classes("image_folder", path=str(tmp_path / "classes")) == 2
    # flat: unlabelled, the whole folder is the test split
    write_images(tmp_path / "flat", 5, seed=3)
    flat = load_dataset("image_folder", split="test", fmt=RAW1, seed=0, path=str(tmp_path / "flat"))
    assert len(flat) == 5 and (flat.labels == -1).all() and flat.num_classes is None
    with pytest.raises(ValueError, match="no val split"):
        load_dataset("image_folder", split="val", fmt=RAW1, seed=0, path=str(tmp_path / "flat"))
    # train/ val/ test/ sub-folders
    for split, n in (("train", 4), ("test", 3)):
        for cls in ("a", "b"):
            write_images(tmp_path / "split" / split / cls, n, seed=hash((split, cls)) % 100)
    tr = load_dataset("image_folder", split="train", fmt=RAW3, seed=0, path=str(tmp_path / "split"))
    assert len(tr) == 8 and tr.num_classes == 2
    with pytest.raises(DataMissingError, match="no val/"):
        check_available("image_folder", split="val", path=str(tmp_path / "split"))
    with pytest.raises(DataMissingError, match="image_folder.*params.path"):
        check_available("image_folder", split="test", path=str(tmp_path / "missing"))
