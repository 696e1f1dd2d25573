"""OpenOOD v1.5's image lists and preprocessing (files written by the test in OpenOOD's on-disk layout)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ood_core.data import DATASETS, DataMissingError, check_available, load_dataset, num_classes
from ood_core.datasets import openood
from ood_core.datasets.base import DatasetParamError, InputFormat

# DATA_INFO of OpenOOD v1.5 (openood/evaluation_api/datasets.py), written out again here as lists of
# (set, split, image folder, list file) so that the catalogue is checked against an independent copy.
EXPECTED = {
    "cifar10": [("id", "train", "images_classic/", "cifar10/train_cifar10.txt"),
                ("id", "val", "images_classic/", "cifar10/val_cifar10.txt"),
                ("id", "test", "images_classic/", "cifar10/test_cifar10.txt"),
                ("tin", "val", "images_classic/", "cifar10/val_tin.txt"),
                ("cifar100", "test", "images_classic/", "cifar10/test_cifar100.txt"),
                ("tin", "test", "images_classic/", "cifar10/test_tin.txt"),
                ("mnist", "test", "images_classic/", "cifar10/test_mnist.txt"),
                ("svhn", "test", "images_classic/", "cifar10/test_svhn.txt"),
                ("texture", "test", "images_classic/", "cifar10/test_texture.txt"),
                ("places365", "test", "images_classic/", "cifar10/test_places365.txt"),
                ("cifar10c", "test", "images_classic/", "cifar10/test_cifar10c.txt"),
                ("cinic10", "test", "images_classic/", "cifar10/val_cinic10.txt")],
    "cifar100": [("id", "train", "images_classic/", "cifar100/train_cifar100.txt"),
                 ("id", "val", "images_classic/", "cifar100/val_cifar100.txt"),
                 ("id", "test", "images_classic/", "cifar100/test_cifar100.txt"),
                 ("tin", "val", "images_classic/", "cifar100/val_tin.txt"),
                 ("cifar10", "test", "images_classic/", "cifar100/test_cifar10.txt"),
                 ("tin", "test", "images_classic/", "cifar100/test_tin.txt"),
                 ("mnist", "test", "images_classic/", "cifar100/test_mnist.txt"),
                 ("svhn", "test", "images_classic/", "cifar100/test_svhn.txt"),
                 ("texture", "test", "images_classic/", "cifar100/test_texture.txt"),
                 ("places365", "test", "images_classic/", "cifar100/test_places365.txt")],
    "imagenet200": [("id", "train", "images_largescale/", "imagenet200/train_imagenet200.txt"),
                    ("id", "val", "images_largescale/", "imagenet200/val_imagenet200.txt"),
                    ("id", "test", "images_largescale/", "imagenet200/test_imagenet200.txt"),
                    ("imagenet_v2", "test", "images_largescale/", "imagenet200/test_imagenet200_v2.txt"),
                    ("imagenet_c", "test", "images_largescale/", "imagenet200/test_imagenet200_c.txt"),
                    ("imagenet_r", "test", "images_largescale/", "imagenet200/test_imagenet200_r.txt"),
                    ("openimage_o", "val", "images_largescale/", "imagenet200/val_openimage_o.txt"),
                    ("ssb_hard", "test", "images_largescale/", "imagenet200/test_ssb_hard.txt"),
                    ("ninco", "test", "images_largescale/", "imagenet200/test_ninco.txt"),
                    ("inaturalist", "test", "images_largescale/", "imagenet200/test_inaturalist.txt"),
                    ("textures", "test", "images_classic/", "imagenet200/test_textures.txt"),
                    ("openimage_o", "test", "images_largescale/", "imagenet200/test_openimage_o.txt")],
    "imagenet1k": [("id", "train", "images_largescale/", "imagenet/train_imagenet.txt"),
                   ("id", "val", "images_largescale/", "imagenet/val_imagenet.txt"),
                   ("id", "test", "images_largescale/", "imagenet/test_imagenet.txt"),
                   ("imagenet_v2", "test", "images_largescale/", "imagenet/test_imagenet_v2.txt"),
                   ("imagenet_c", "test", "images_largescale/", "imagenet/test_imagenet_c.txt"),
                   ("imagenet_r", "test", "images_largescale/", "imagenet/test_imagenet_r.txt"),
                   ("imagenet_es", "test", "images_largescale/", "imagenet/test_imagenet_es.txt"),
                   ("openimage_o", "val", "images_largescale/", "imagenet/val_openimage_o.txt"),
                   ("ssb_hard", "test", "images_largescale/", "imagenet/test_ssb_hard.txt"),
                   ("ninco", "test", "images_largescale/", "imagenet/test_ninco.txt"),
                   ("inaturalist", "test", "images_largescale/", "imagenet/test_inaturalist.txt"),
                   ("textures", "test", "images_classic/", "imagenet/test_textures.txt"),
                   ("openimage_o", "test", "images_largescale/", "imagenet/test_openimage_o.txt")],
}
CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet200": 200, "imagenet1k": 1000}


def _image(path: Path, size, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    w, h = size
    arr = rng.integers(0, 256, size=(h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)


def _fake_root(root: Path, sizes=((40, 36), (36, 50)), ext=(".png", ".jpg")) -> Path:
    """Every list of every benchmark, each with two images (a PNG and a JPEG) in OpenOOD's folders."""
    for bench, rows in EXPECTED.items():
        for k, (set_, split, folder, lst) in enumerate(rows):
            lines = []
            for j, (size, e) in enumerate(zip(sizes, ext)):
                rel = f"{bench}_{set_}/{split}/img{j}{e}"
                if set_ == "imagenet_c":
                    size = (224, 224)
                _image(root / folder / rel, size, seed=100 * k + j)
                lines.append(f"{rel} {j}")
            (root / "benchmark_imglist" / lst).parent.mkdir(parents=True, exist_ok=True)
            (root / "benchmark_imglist" / lst).write_text("\n".join(lines) + "\n")
    return root


def _openood_reference(path: Path, pre_size: int, image_size: int, mean, std) -> torch.Tensor:
    """OpenOOD's TestStandardPreProcessor (evaluation_api/preprocessor.py) as a plain torchvision composition."""
    import torchvision.transforms as T

    tf = T.Compose([lambda im: im.convert("RGB"),
                    T.Resize(pre_size, interpolation=T.InterpolationMode.BILINEAR),
                    T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])
    with Image.open(path) as im:
        return tf(im)


def test_catalogue_matches_openood_data_info(tmp_path):
    for bench, rows in EXPECTED.items():
        lists = openood.resolve_lists(str(tmp_path), bench)
        got = {(s, sp, str(img.relative_to(tmp_path)) + "/", str(lst.relative_to(tmp_path / "benchmark_imglist")))
               for s, splits in lists.items() for sp, (lst, img) in splits.items()}
        assert got == set(rows), bench
        entry = DATASETS[openood.dataset_name(bench)]
        assert entry.num_classes == CLASSES[bench] == num_classes(openood.dataset_name(bench))
    b = openood.CATALOGUE["imagenet200"]
    assert b.sets_of("near") == ["ssb_hard", "ninco"]
    assert b.sets_of("far") == ["inaturalist", "textures", "openimage_o"]
    assert openood.CATALOGUE["cifar10"].ood_val == "tin" and openood.CATALOGUE["imagenet1k"].ood_val == "openimage_o"


def test_every_list_resolves_and_loads_from_a_fake_root(tmp_path):
    root = _fake_root(tmp_path)
    for bench, rows in EXPECTED.items():
        name = openood.dataset_name(bench)
        fmt = DATASETS[name].default_format
        for set_, split, _folder, _lst in rows:
            check_available(name, split=split, root=str(root), set=set_)
            ds = load_dataset(name, split=split, fmt=fmt, seed=0, root=str(root), set=set_)
            assert len(ds) == 2
            x, y = ds[1]
            assert x.shape == (3, fmt.image_size, fmt.image_size) and x.dtype == torch.float32
            role = openood.CATALOGUE[bench].sets[set_][0]
            ood = role in ("near", "far") or split == "val" and set_ != "id"
            assert int(y) == (-1 if ood else 1), (bench, set_, split)


@pytest.mark.parametrize("bench,ext,size", [("cifar10", ".png", (40, 36)), ("cifar100", ".jpg", (36, 50)),
                                            ("imagenet200", ".png", (300, 260)), ("imagenet1k", ".jpg", (260, 333))])
def test_preprocessing_equals_openood_torchvision_composition(tmp_path, bench, ext, size):
    rel = f"x/sub/img{ext}"
    b = openood.CATALOGUE[bench]
    folder = tmp_path / ("images_largescale" if "imagenet" in bench else "images_classic")
    _image(folder / rel, size, seed=3)
    lst = tmp_path / "benchmark_imglist" / b.sets["id"][1]["test"][1].split("/", 1)[1]
    lst.parent.mkdir(parents=True, exist_ok=True)
    lst.write_text(f"{rel} 3\n")
    fmt = DATASETS[openood.dataset_name(bench)].default_format
    x, y = load_dataset(openood.dataset_name(bench), split="test", fmt=fmt, seed=0, root=str(tmp_path))[0]
    pre = 32 if "cifar" in bench else 256
    ref = _openood_reference(folder / rel, pre, fmt.image_size, fmt.mean, fmt.std)
    assert int(y) == 3
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)
    # a gray image goes through Convert('RGB') as OpenOOD's does
    _image(folder / rel, size, mode="L", seed=4)
    x = load_dataset(openood.dataset_name(bench), split="test", fmt=fmt, seed=0, root=str(tmp_path))[0][0]
    torch.testing.assert_close(x, _openood_reference(folder / rel, pre, fmt.image_size, fmt.mean, fmt.std),
                               rtol=0, atol=1e-6)


def test_openood_normalization_values():
    # default_preprocessing_dict of OpenOOD v1.5's evaluation_api/preprocessor.py
    assert openood.CIFAR100_FORMAT.mean == (0.5071, 0.4867, 0.4408)
    assert openood.CIFAR100_FORMAT.std == (0.2675, 0.2565, 0.2761)
    assert openood.CIFAR10_FORMAT.std == (0.2470, 0.2435, 0.2616)
    assert openood.IMAGENET_FORMAT == InputFormat(3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_imagenet_c_is_only_normalized(tmp_path):
    root = _fake_root(tmp_path)
    fmt = openood.IMAGENET_FORMAT
    ds = load_dataset("openood_imagenet200", split="test", fmt=fmt, seed=0, root=str(root), set="imagenet_c")
    path = root / "images_largescale" / ds.paths[0]
    with Image.open(path) as im:
        arr = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255
    ref = (arr - torch.tensor(fmt.mean).view(3, 1, 1)) / torch.tensor(fmt.std).view(3, 1, 1)
    torch.testing.assert_close(ds[0][0], ref, rtol=0, atol=1e-6)


def test_missing_list_names_it_and_the_download_script(tmp_path):
    with pytest.raises(DataMissingError) as exc:
        check_available("openood_cifar10", split="test", root=str(tmp_path), set="tin")
    msg = str(exc.value)
    assert "benchmark_imglist/cifar10/test_tin.txt" in msg and "download.py" in msg and "cifar-10" in msg
    assert "\n" not in msg


def test_missing_image_folder_names_it(tmp_path):
    root = _fake_root(tmp_path)
    import shutil

    shutil.rmtree(root / "images_classic" / "imagenet200_textures")
    with pytest.raises(DataMissingError) as exc:
        check_available("openood_imagenet200", split="test", root=str(root), set="textures")
    assert "images_classic/imagenet200_textures" in str(exc.value)
    assert "imagenet-200" in str(exc.value)
    # the build stops the same way, before decoding anything
    with pytest.raises(DataMissingError):
        load_dataset("openood_imagenet200", split="test", fmt=openood.IMAGENET_FORMAT, seed=0, root=str(root),
                     set="textures")


def test_bad_set_or_split_is_a_parameter_error(tmp_path):
    with pytest.raises(DatasetParamError) as exc:
        check_available("openood_cifar10", split="test", root=str(tmp_path), set="imagenet_c")
    assert exc.value.param == "set"
    with pytest.raises(DatasetParamError) as exc:
        check_available("openood_cifar10", split="val", root=str(tmp_path), set="svhn")
    assert exc.value.param == "split" and "'tin'" in str(exc.value)


def test_max_samples_and_bad_list_line(tmp_path):
    root = _fake_root(tmp_path)
    ds = load_dataset("openood_cifar10", split="train", fmt=openood.CIFAR10_FORMAT, seed=0, root=str(root),
                      max_samples=1)
    assert len(ds) == 1
    lst = root / "benchmark_imglist/cifar10/test_cifar10.txt"
    lst.write_text(lst.read_text() + "cifar10_id/test/img0.png notalabel\n")
    from ood_core.datasets.base import DataFileError

    with pytest.raises(DataFileError, match="line 3"):
        load_dataset("openood_cifar10", split="test", fmt=openood.CIFAR10_FORMAT, seed=0, root=str(root))


def _sweep(tmp_path: Path, root: Path):
    import yaml

    from orchestrator.config import load_config

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml").read_text())
    raw["storage"] = str(tmp_path / "store")
    p = {"root": str(root)}
    raw["data"] = {"id": {"dataset": "openood_cifar10", "params": p},
                   "ood_val": [{"name": "tin-val", "dataset": "openood_cifar10", "split": "val", "params": dict(p, set="tin")}],
                   "ood_test": {"near": [{"name": "tin", "dataset": "openood_cifar10", "params": dict(p, set="tin")}],
                                "far": [{"name": "svhn", "dataset": "openood_cifar10", "params": dict(p, set="svhn")}]}}
    raw["backbones"] = [{"name": "r18", "arch": "resnet18_32x32", "seeds": [0], "train": {"epochs": 1}}]
    raw["extract"]["layers"] = ["logits", "penultimate"]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(str(path))


def test_plan_check_inputs_reports_missing_openood_data(tmp_path):
    from orchestrator.plan import check_inputs

    cfg = _sweep(tmp_path, tmp_path / "nothing")
    problems = check_inputs(cfg, fetch=False)  # validate: warnings naming every missing list
    assert any("cifar10/train_cifar10.txt" in p for p in problems)
    assert any("cifar10/val_tin.txt" in p for p in problems) and any("test_svhn.txt" in p for p in problems)
    with pytest.raises(DataMissingError, match="download.py"):  # sweep: stops before any work
        check_inputs(cfg, fetch=True)
    root = _fake_root(tmp_path / "data")
    assert check_inputs(_sweep(tmp_path, root), fetch=True) == []
