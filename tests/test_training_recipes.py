"""Training recipes, schedules, batch augmentation and resuming from the epoch checkpoint."""
import dataclasses
import math

import pytest
import torch

from ood_core import storage
from ood_core.augment import BatchAugment, adjust_hue
from ood_core.data import DATASETS, load_dataset
from ood_core.models import build_model
from ood_core.training import RECIPES, TrainConfig, _lr_lambda, make_train_config, train_classifier

FMT = DATASETS["digits"].default_format


@pytest.fixture(scope="module")
def digits():
    train = load_dataset("digits", split="train", fmt=FMT, seed=0)
    small = torch.utils.data.TensorDataset(train.tensors[0][:192], train.tensors[1][:192])
    return small, load_dataset("digits", split="val", fmt=FMT, seed=0)


def test_recipes_and_overrides():
    assert set(RECIPES) == {"openood_v1.5", "practical_cifar100"}
    oo = make_train_config("openood_v1.5")
    assert (oo.epochs, oo.batch_size, oo.lr, oo.momentum, oo.nesterov, oo.weight_decay) == (100, 128, 0.1, 0.9, True, 5e-4)
    assert oo.schedule == "cosine" and oo.augment == "crop_flip" and oo.crop_padding == 4
    pw = make_train_config("practical_cifar100", epochs=3, lr=None)
    assert pw.epochs == 3 and pw.lr == 1e-3 and pw.momentum == 0.95 and not pw.nesterov
    assert pw.schedule == "multistep" and pw.milestones == (60, 120, 160) and pw.gamma == 0.2 and pw.batch_size == 8
    assert make_train_config() == TrainConfig()
    with pytest.raises(ValueError, match="unknown training recipe 'fast'"):
        make_train_config("fast")
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        make_train_config(epoch=3)
    with pytest.raises(ValueError, match="milestones"):
        TrainConfig(schedule="multistep")
    with pytest.raises(ValueError, match="augment"):
        TrainConfig(augment="mixup")


def test_config_section_mirrors_train_config():
    from orchestrator.config import TrainSection

    section = TrainSection().model_dump()
    assert section.pop("recipe") is None
    expect = TrainConfig().to_dict()
    assert section == expect
    resolved = TrainSection(recipe="openood_v1.5", epochs=7).model_dump()
    assert resolved["epochs"] == 7 and resolved["lr"] == 0.1 and resolved["augment"] == "crop_flip"
    recipe = resolved.pop("recipe")
    assert make_train_config(recipe, **resolved) == make_train_config("openood_v1.5", epochs=7)
    with pytest.raises(Exception, match="unknown training recipe"):
        TrainSection(recipe="nope")


def test_schedules():
    cos = _lr_lambda(TrainConfig(epochs=2, lr=0.1, min_lr=1e-6), steps_per_epoch=5)
    assert cos(0) == 1 and cos(10) == pytest.approx(1e-5) and cos(5) == pytest.approx(1e-5 + (1 - 1e-5) / 2)
    ms = _lr_lambda(TrainConfig(schedule="multistep", milestones=(2, 4), gamma=0.2), 10)
    assert [ms(e) for e in range(6)] == pytest.approx([1, 1, 0.2, 0.2, 0.04, 0.04])


def test_crop_flip_augmentation():
    mean, std = (0.5,), (0.25,)
    x = torch.randn(64, 1, 8, 8)
    aug = BatchAugment("crop_flip", mean=mean, std=std, padding=2, generator=torch.Generator().manual_seed(0))
    out = aug(x)
    again = BatchAugment("crop_flip", mean=mean, std=std, padding=2, generator=torch.Generator().manual_seed(0))(x)
    assert out.shape == x.shape and torch.equal(out, again)
    black = (0 - 0.5) / 0.25
    for i in range(64):  # every output is a shifted (maybe flipped) window of the black-padded input
        padded = torch.full((1, 12, 12), black)
        padded[:, 2:10, 2:10] = x[i]
        windows = [padded[:, a:a + 8, b:b + 8] for a in range(5) for b in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    assert BatchAugment("none", mean=mean, std=std)(x) is x


def test_strong_augmentation_and_hue():
    import torchvision.transforms.functional as TF

    rgb = torch.rand(3, 3, 16, 16)
    for shift in (-0.1, 0.05, 0.3):
        ours = adjust_hue(rgb, torch.full((3,), shift))
        ref = torch.stack([TF.adjust_hue(im, shift) for im in rgb])
        assert torch.allclose(ours, ref, atol=1e-5)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    x = (torch.rand(32, 3, 16, 16) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    aug = BatchAugment("crop_flip_rotate_jitter_erase", mean=mean, std=std, generator=torch.Generator().manual_seed(1))
    out = aug(x)
    assert out.shape == x.shape and torch.isfinite(out).all() and not torch.equal(out, x)
    erased = BatchAugment("none", mean=mean, std=std, generator=torch.Generator().manual_seed(2), erase_p=1.0).erase(x)
    assert ((erased == 0).float().mean(dim=(1, 2, 3)) > 0.01).all()  # every image lost a box


def _run(digits, cfg, resume_uri=None, on_epoch=None, seed=3):
    model = build_model("small_cnn", num_classes=10, in_channels=1, image_size=16, seed=seed, width=0.5)
    hist = train_classifier(model, digits[0], digits[1], cfg, seed=seed, device="cpu", resume_uri=resume_uri,
                            on_epoch=on_epoch)
    return model, hist


class Interrupt(Exception):
    pass


def test_resume_gives_the_uninterrupted_result(digits, tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, augment="crop_flip", crop_padding=2)
    ref_model, ref_hist = _run(digits, cfg)
    uri = str(tmp_path / "ckpt.pt.resume")

    def stop_after_2(row):
        if row["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        _run(digits, cfg, resume_uri=uri, on_epoch=stop_after_2)
    assert storage.exists(uri)
    seen = []
    model, hist = _run(digits, cfg, resume_uri=uri, on_epoch=seen.append)
    assert [r["epoch"] for r in seen] == [3]  # only the new epoch ran
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    for a, b in zip(hist, ref_hist):
        assert a["train_loss"] == b["train_loss"] and a["val_acc"] == b["val_acc"]
    for (k, v), w in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(v, w), k
    # a finished resume file: nothing left to run, the best weights come back
    model2, hist2 = _run(digits, cfg, resume_uri=uri, on_epoch=seen.append)
    assert len(seen) == 1 and len(hist2) == 3
    assert all(torch.equal(v, w) for v, w in zip(model2.state_dict().values(), ref_model.state_dict().values()))


def test_unusable_resume_files_are_ignored(digits, tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=64)
    bad = tmp_path / "bad.resume"
    bad.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable resume checkpoint"):
        _, hist = _run(digits, cfg, resume_uri=str(bad))
    assert len(hist) == 1
    other = dataclasses.replace(cfg, lr=0.01)  # the file now belongs to another configuration
    with pytest.warns(UserWarning, match="another configuration"):
        _, hist = _run(digits, other, resume_uri=str(bad))
    assert len(hist) == 1 and math.isfinite(hist[0]["train_loss"])
