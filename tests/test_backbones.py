"""Backbones: the detector-facing contract on tiny inputs, pretrained weights, user checkpoints."""
import hashlib

import pytest
import torch
from torch import nn

from ood_core.checkpoints import CheckpointError, load_user_checkpoint, save_checkpoint
from ood_core.models import (ARCHITECTURES, WeightsMissingError, architecture_params, build_model,
                             check_weights_available)

DIMS = {"small_cnn": 128, "resnet18": 512, "resnet34": 512, "vgg16": 512, "densenet100": 342, "wrn40_2": 128,
        "resnet18_imagenet": 512, "resnet50_imagenet": 2048}
@pytest.fixture(autouse=True, scope="module")
def _plain_cpu_convolutions():
    """oneDNN builds a kernel per new convolution shape (seconds for DenseNet's ~100 shapes on a
    busy 2-core machine); the native kernels answer these tiny inputs at once."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = before


# input size -> feature-map size (small inputs keep the CPU test fast; the CIFAR nets see 32x32)
SIZES = {"resnet18": (32, 4), "resnet34": (16, 2), "vgg16": (32, 1), "densenet100": (16, 4), "wrn40_2": (16, 4),
         "small_cnn": (16, 8), "resnet18_imagenet": (32, 1), "resnet50_imagenet": (32, 1)}


@pytest.mark.parametrize("arch", sorted(DIMS))
def test_contract(arch):
    torch.manual_seed(0)
    size, fm = SIZES[arch]
    m = build_model(arch, num_classes=10, in_channels=3, image_size=size, seed=0).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        maps, out = m.feature_maps(x), m(x)
        z = m.pool_features(maps)
    assert m.feature_dim == DIMS[arch] and z.shape == (2, DIMS[arch]) and out.shape == (2, 10)
    assert maps.shape == (2, DIMS[arch], fm, fm)
    assert isinstance(m.head, nn.Linear) and m.head.weight.shape == (10, DIMS[arch]) and m.head.bias.shape == (10,)
    assert torch.allclose(out, m.head(z), atol=1e-5) and torch.allclose(out, m.pool_head(maps), atol=1e-5)
    assert torch.allclose(z, maps.mean(dim=(2, 3)), atol=1e-5)
    names = dict(m.named_modules())
    assert m.stages and all(s in names for s in m.stages) and m.num_classes == 10
    convs = [n for n, mod in names.items() if isinstance(mod, nn.Conv2d)]
    assert convs[0].endswith("conv1")  # network order: the stem first


def test_resnet18_cifar_layout_and_gray_inputs():
    m = build_model("resnet18", num_classes=10, in_channels=3, image_size=32)
    keys = m.state_dict().keys()
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not any(isinstance(mod, nn.MaxPool2d) for mod in m.modules())
    assert "layer2.0.shortcut.0.weight" in keys and "head.weight" in keys  # OpenOOD names (fc -> head)
    g = build_model("resnet18", num_classes=4, in_channels=1, image_size=28, seed=0).eval()
    assert g.feature_maps(torch.randn(2, 1, 28, 28)).shape == (2, 512, 4, 4)
    with pytest.raises(ValueError, match="image_size"):
        build_model("vgg16", num_classes=3, in_channels=3, image_size=28)


def test_dropout_only_in_training():
    m = build_model("resnet18", num_classes=5, in_channels=3, image_size=32, dropout=0.5, seed=0)
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        assert torch.allclose(m(x), m.head(m.features(x)), atol=1e-5)
    assert architecture_params("resnet18") == {"dropout": 0.0}
    assert architecture_params("resnet18_imagenet") == {"weights": None, "input_size": None, "dropout": 0.0}
    assert set(ARCHITECTURES) >= set(DIMS)


@pytest.fixture
def hub(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def test_imagenet_weights_from_the_hub_cache(hub):
    import torchvision
    from ood_core.backbones.imagenet import weights_path

    with pytest.raises(WeightsMissingError, match="not cached at .*resnet18"):
        check_weights_available("resnet18_imagenet", weights="imagenet")
    # validation builds the architecture without touching the weights
    m = build_model("resnet18_imagenet", num_classes=10, in_channels=3, image_size=32, weights="imagenet",
                    load_weights=False)
    assert m.input_size == 224
    # a weights file in torch hub's cache (what torchvision downloads) is loaded
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    path = weights_path("resnet18_imagenet", "imagenet")
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    check_weights_available("resnet18_imagenet", weights="imagenet")
    m = build_model("resnet18_imagenet", num_classes=10, in_channels=1, image_size=32, weights="imagenet").eval()
    assert torch.allclose(m.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    assert torch.allclose(m.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))  # gray stem
    assert m.head.out_features == 10
    full = build_model("resnet18_imagenet", num_classes=1000, in_channels=3, image_size=32, weights="imagenet").eval()
    assert torch.equal(full.head.weight, ref.fc.weight)
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(full(x), ref.eval()(x), atol=1e-4)  # same network as torchvision's
    with pytest.raises(ValueError, match="weights"):
        build_model("resnet18_imagenet", num_classes=3, in_channels=3, image_size=32, weights="places")


def _save(obj, path):
    torch.save(obj, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_user_checkpoints(tmp_path):
    src = build_model("resnet18", num_classes=10, in_channels=3, image_size=32, seed=1)
    # OpenOOD / DataParallel style: "module." prefix, classifier called fc, wrapped in a dict
    foreign = {("module." + k.replace("head.", "fc.")): v for k, v in src.state_dict().items()
               if not k.endswith("num_batches_tracked")}
    sha = _save({"epoch": 99, "state_dict": foreign}, tmp_path / "openood.ckpt")
    dst = build_model("resnet18", num_classes=10, in_channels=3, image_size=32, seed=2)
    info = load_user_checkpoint(str(tmp_path / "openood.ckpt"), dst, arch="resnet18")
    assert info["sha256"] == sha and info["format"] == "state_dict"
    for k, v in src.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(dst.state_dict()[k], v), k
    # our own format, checked against the architecture
    save_checkpoint(str(tmp_path / "ours.pt"), src, {"arch": "resnet18"})
    assert load_user_checkpoint(str(tmp_path / "ours.pt"), dst, arch="resnet18")["format"] == "ood-sweep"
    with pytest.raises(CheckpointError, match="of 'resnet18', not of 'resnet34'"):
        load_user_checkpoint(str(tmp_path / "ours.pt"), build_model("resnet34", num_classes=10, in_channels=3,
                                                                    image_size=32), arch="resnet34")
    # mismatches and corrupt files are clear errors
    with pytest.raises(CheckpointError, match="shape mismatches: head.weight"):
        load_user_checkpoint(str(tmp_path / "openood.ckpt"),
                             build_model("resnet18", num_classes=100, in_channels=3, image_size=32))
    with pytest.raises(CheckpointError, match="missing keys|unexpected keys"):
        load_user_checkpoint(str(tmp_path / "openood.ckpt"), build_model("wrn40_2", num_classes=10, in_channels=3,
                                                                         image_size=32))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_user_checkpoint(str(tmp_path / "bad.pt"), dst)
    torch.save(nn.Linear(2, 2), tmp_path / "pickled.pt")  # a whole pickled module: refused by weights_only
    with pytest.raises(CheckpointError, match="weights-only"):
        load_user_checkpoint(str(tmp_path / "pickled.pt"), dst)
    with pytest.raises(CheckpointError, match="not found"):
        load_user_checkpoint(str(tmp_path / "none.pt"), dst)
    with pytest.raises(CheckpointError, match="sha256"):
        load_user_checkpoint(str(tmp_path / "openood.ckpt"), dst, expected_sha256="0" * 64)
