"""OpenOOD v1.5's checkpoints and torchvision's weights files load as backbones (files written by the test)."""
import torch
import torch.nn.functional as F
import pytest
from torch import nn

from ood_core.checkpoints import CheckpointError, load_user_checkpoint
from ood_core.hooks import select_layers
from ood_core.models import build_model


class _OpenOODBlock(nn.Module):
    """OpenOOD's BasicBlock (openood/networks/resnet18_32x32.py), written again from its code."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _OpenOODResNet18_32x32(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for k, planes in enumerate((64, 128, 256, 512)):
            blocks = [_OpenOODBlock(cin, planes, 1 if k == 0 else 2), _OpenOODBlock(planes, planes, 1)]
            setattr(self, f"layer{k + 1}", nn.Sequential(*blocks))
            cin = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def test_openood_best_ckpt_from_our_state_dict_gives_same_logits(tmp_path):
    ours = build_model("resnet18", num_classes=10, in_channels=3, image_size=32, seed=0).eval()
    _randomize_bn(ours)
    # OpenOOD's naming: its classifier is fc, its shortcut convs are layerK.0.shortcut.{0,1}; no num_batches_tracked
    renamed = {("fc." + k[5:] if k.startswith("head.") else k): v for k, v in ours.state_dict().items()
               if not k.endswith("num_batches_tracked")}
    assert "layer2.0.shortcut.0.weight" in renamed and "fc.weight" in renamed
    ref = _OpenOODResNet18_32x32(10)
    ref.load_state_dict({k: v for k, v in renamed.items()}, strict=False)
    assert set(ref.state_dict()) - set(renamed) == {k for k in ref.state_dict() if k.endswith("num_batches_tracked")}
    path = tmp_path / "best.ckpt"
    torch.save(renamed, path)  # OpenOOD saves a plain state_dict

    model = build_model("resnet18_32x32", num_classes=10, in_channels=3, image_size=32)
    info = load_user_checkpoint(str(path), model)
    assert len(info["sha256"]) == 64 and info["format"] == "state_dict"
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ours(x))
        torch.testing.assert_close(model(x), ref.eval()(x), rtol=1e-5, atol=1e-5)  # OpenOOD's own forward
    names = dict(model.named_modules())
    assert "layer3.0.shortcut.0" in names and "layer4.1.bn2" in names
    assert select_layers(model, preset="blocks") == ["layer1", "layer2", "layer3", "layer4"]


def test_checkpoint_that_does_not_fit_names_the_keys(tmp_path):
    ours = build_model("resnet18", num_classes=10, in_channels=3, image_size=32, seed=0)
    state = {("fc." + k[5:] if k.startswith("head.") else k): v for k, v in ours.state_dict().items()}
    # torchvision's name for the shortcut: must be refused, naming the keys
    state = {k.replace("layer2.0.shortcut.", "layer2.0.downsample."): v for k, v in state.items()}
    torch.save(state, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError) as exc:
        load_user_checkpoint(str(tmp_path / "bad.ckpt"), build_model("resnet18_32x32", num_classes=10,
                                                                    in_channels=3, image_size=32))
    msg = str(exc.value)
    assert "layer2.0.shortcut.0.weight" in msg and "layer2.0.downsample.0.weight" in msg and "\n" not in msg
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, tmp_path / "c100.ckpt")
    with pytest.raises(CheckpointError, match="head.weight"):
        load_user_checkpoint(str(tmp_path / "c100.ckpt"), build_model("resnet18_32x32", num_classes=10,
                                                                     in_channels=3, image_size=32))


def test_resnet18_224x224_loads_torchvision_keys(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18(weights=None, num_classes=200).eval()
    _randomize_bn(tv)
    torch.save(tv.state_dict(), tmp_path / "best.ckpt")
    model = build_model("resnet18_224x224", num_classes=200, in_channels=3, image_size=224)
    load_user_checkpoint(str(tmp_path / "best.ckpt"), model)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), tv(x))
        torch.testing.assert_close(model.head(model.features(x)), tv(x))
    assert "layer2.0.downsample.0" in dict(model.named_modules())


@pytest.mark.parametrize("arch,factory", [("vit_b_16", "vit_b_16"), ("swin_t", "swin_t"),
                                          ("resnet50_imagenet", "resnet50")])
def test_torchvision_imagenet_weights_file_loads(tmp_path, arch, factory):
    import torchvision

    torch.manual_seed(0)
    tv = getattr(torchvision.models, factory)(weights=None).eval()
    path = tmp_path / f"{factory}.pth"
    torch.save(tv.state_dict(), path)  # torchvision's published weights files are plain state dicts
    model = build_model(arch, num_classes=1000, in_channels=3, image_size=224)
    load_user_checkpoint(str(path), model)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tv(x)
        model.eval()
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.head(model.features(x)), ref, rtol=1e-4, atol=1e-4)
        assert model.features(x).shape == (2, model.feature_dim)
    assert select_layers(model, preset="penultimate") == [model.stages[-1]]
