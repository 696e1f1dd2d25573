"""Any torchvision / timm classifier by name (``torchvision:<name>``, ``timm:<name>``) and the token-aware reductions.

Tiny models only, CPU, no downloads: torchvision's ``resnet18`` / ``mobilenet_v3_small`` / ``swin_t`` at 32 px and
timm's ``test_vit`` / ``test_convnext`` / ``resnet10t`` (timm is a test dependency).
"""
import copy
import hashlib

import pytest
import torch
from torch import nn

from ood_core.checkpoints import CheckpointError, load_user_checkpoint
from ood_core.hooks import LayerSpec, capture_batch, column_widths, reduce_output, select_layers
from ood_core.models import build_model, check_architecture

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

SIZE = 32
CASES = [  # arch, in_channels, classifier name in the library, renamed top-level modules
    ("torchvision:resnet18", 3, "fc", {}),
    ("torchvision:mobilenet_v3_small", 1, "classifier.3", {"features": "body"}),
    ("timm:resnet10t", 1, "fc", {}),
    ("timm:test_vit", 3, "head", {}),
    ("timm:test_convnext", 3, "head.fc", {"stages": "stages_", "head": "head_"}),
]


def _x(n=2, c=3, size=SIZE, seed=0):
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def _library_net(arch, num_classes, in_channels):
    library, name = arch.split(":", 1)
    if library == "timm":
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels,
                                 **({"img_size": SIZE} if "vit" in name else {}))
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    assert in_channels == 3
    return net


def _randomize_norms(net):
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        if isinstance(m, nn.Linear) and m.weight.abs().sum() == 0:  # torchvision's ViT zero-inits its head
            nn.init.normal_(m.weight, std=0.1, generator=g)


@pytest.mark.parametrize("arch,channels,_clf,_renamed", CASES)
def test_build_by_name_follows_the_backbone_contract(arch, channels, _clf, _renamed):
    m = build_model(arch, num_classes=7, in_channels=channels, image_size=SIZE, seed=0).eval()
    _randomize_norms(m)
    x = _x(c=channels)
    with torch.no_grad():
        logits = m(x)
        feats = m.features(x)
        maps = m.feature_maps(x)
        assert logits.shape == (2, 7) and feats.shape == (2, m.feature_dim) and m.num_classes == 7
        torch.testing.assert_close(m.head(feats), logits)
        assert maps.ndim == 4 and maps.shape[1] == m.feature_dim
        torch.testing.assert_close(m.pool_head(maps), logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(copy.deepcopy(m)(x), logits)  # the copy runs its own modules
    assert isinstance(m.head, nn.Linear) and m.head.out_features == 7
    assert m.stages and all(s in dict(m.named_modules()) for s in m.stages)
    # same seed, same weights; the global RNG is untouched
    state = torch.random.get_rng_state()
    again = build_model(arch, num_classes=7, in_channels=channels, image_size=SIZE, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (k, a), (_k, b) in zip(m.state_dict().items(), again.state_dict().items()):
        if "running" not in k and k not in ("head.weight",):
            assert torch.equal(a, b), k


def test_spatial_maps_where_features_are_their_average():
    resnet = build_model("torchvision:resnet18", num_classes=3, in_channels=3, image_size=64).eval()
    with torch.no_grad():
        maps = resnet.feature_maps(_x(size=64))
    assert maps.shape == (2, 512, 2, 2)  # layer4's output, before torchvision's avgpool
    vit = build_model("timm:test_vit", num_classes=3, in_channels=3, image_size=SIZE).eval()
    with torch.no_grad():
        assert vit.feature_maps(_x()).shape == (2, vit.feature_dim, 1, 1)  # pre-logits (class token after norm)


@pytest.mark.parametrize("arch,channels,clf,renamed", [c for c in CASES if c[1] == 3])
def test_library_state_dict_loads_and_gives_the_same_logits(tmp_path, arch, channels, clf, renamed):
    torch.manual_seed(0)
    net = _library_net(arch, 5, channels).eval()
    _randomize_norms(net)
    path = tmp_path / "weights.pth"
    torch.save(net.state_dict(), path)  # a plain state dict with the library's keys
    model = build_model(arch, num_classes=5, in_channels=channels, image_size=SIZE, seed=3)
    info = load_user_checkpoint(str(path), model, arch=arch)  # weights_only=True inside
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and info["format"] == "state_dict"
    assert clf == "head" or (f"{clf}.", "head.") in model.checkpoint_aliases
    for theirs, ours in renamed.items():
        assert (f"{theirs}.", f"{ours}.") in model.checkpoint_aliases and ours in dict(model.named_children())
    x = _x()
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)
        if arch.startswith("timm:"):  # the features are timm's pre-logits
            torch.testing.assert_close(model.features(x), net.forward_head(net.forward_features(x), pre_logits=True),
                                       rtol=1e-5, atol=1e-5)


def test_mismatching_state_dict_names_the_keys(tmp_path):
    torch.save(torchvision.models.resnet34(weights=None, num_classes=5).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys: .*layer1\.2\.bn1"):
        load_user_checkpoint(str(tmp_path / "r34.pth"),
                             build_model("torchvision:resnet18", num_classes=5, in_channels=3, image_size=SIZE))
    torch.save(_library_net("timm:test_vit", 10, 3).state_dict(), tmp_path / "vit10.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatches: head\.weight: checkpoint \(10, 64\) vs model \(5, 64\)"):
        load_user_checkpoint(str(tmp_path / "vit10.pth"),
                             build_model("timm:test_vit", num_classes=5, in_channels=3, image_size=SIZE))
    torch.save(_library_net("timm:test_vit", 5, 3).state_dict(), tmp_path / "vit32.pth")
    with pytest.raises(CheckpointError, match=r"pos_embed: checkpoint \(1, 5, 64\) vs model \(1, 17, 64\)"):
        load_user_checkpoint(str(tmp_path / "vit32.pth"),  # trained at 32 px, built for 64 px
                             build_model("timm:test_vit", num_classes=5, in_channels=3, image_size=64))


def test_unknown_names_are_refused_with_close_matches():
    with pytest.raises(ValueError, match=r"unknown torchvision architecture 'mobilenet_v3_smal'; close matches: "
                                         r"mobilenet_v3_small"):
        build_model("torchvision:mobilenet_v3_smal", num_classes=3, in_channels=3, image_size=SIZE)
    with pytest.raises(ValueError, match=r"unknown timm architecture 'resnet10tt'; close matches: resnet10t"):
        check_architecture("timm:resnet10tt")
    with pytest.raises(ValueError, match=r"did you mean torchvision:mobilenet_v3_small\?"):
        check_architecture("mobilenet_v3_small")
    with pytest.raises(ValueError, match=r"close matches: resnet18"):
        check_architecture("resnet19")
    with pytest.raises(ValueError, match="1x1 convolution"):
        check_architecture("torchvision:squeezenet1_0")
    with pytest.raises(ValueError, match="would download weights"):
        build_model("timm:test_vit", num_classes=3, in_channels=3, image_size=SIZE, pretrained=True)
    check_architecture("torchvision:vit_b_16")
    check_architecture("timm:test_vit")
    check_architecture("small_cnn")


def test_config_validation_names_the_field(tmp_path, capsys):
    from pathlib import Path

    import yaml

    from orchestrator.cli import main
    from orchestrator.config import ConfigError, parse_config

    quickstart = Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml"
    cfg = yaml.safe_load(quickstart.read_text())
    cfg["backbones"][0]["arch"] = "torchvision:mobilenet_v3_small"
    parse_config(copy.deepcopy(cfg))
    cfg["backbones"][0]["arch"] = "torchvision:mobilenet_v3_smal"
    with pytest.raises(ConfigError, match=r"^backbones\[0\]\.arch: unknown torchvision architecture 'mobilenet_v3_smal'"):
        parse_config(copy.deepcopy(cfg))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "error: backbones[0].arch: unknown torchvision architecture 'mobilenet_v3_smal'; close matches: "
        "mobilenet_v3_small"), err


def test_sizes_the_network_cannot_take_are_refused_at_build():
    with pytest.raises(ValueError, match=r"torchvision:vit_b_16.*(indivisible|30)"):
        build_model("torchvision:vit_b_16", num_classes=3, in_channels=3, image_size=30)
    with pytest.raises(ValueError, match=r"torchvision:inception_v3 cannot take 3x32x32 inputs"):
        build_model("torchvision:inception_v3", num_classes=3, in_channels=3, image_size=32)
    vit = build_model("timm:test_vit", num_classes=3, in_channels=3, image_size=48)  # position embedding for 48 px
    assert tuple(vit.pos_embed.shape) == (1, 1 + 9, 64)


def test_modules_are_hooked_by_their_dotted_name():
    torch.manual_seed(0)
    net = _library_net("timm:test_vit", 4, 3).eval()
    model = build_model("timm:test_vit", num_classes=4, in_channels=3, image_size=SIZE)
    model.load_state_dict(net.state_dict())
    model.eval()
    seen = {}
    net.get_submodule("blocks.1.attn.qkv").register_forward_hook(lambda m, i, o: seen.setdefault("qkv", o))
    net.get_submodule("blocks.2").register_forward_hook(lambda m, i, o: seen.setdefault("block", o))
    x = _x()
    with torch.no_grad():
        net(x)
    out = capture_batch(model, x, [LayerSpec("qkv", "blocks.1.attn.qkv", "none"),
                                   LayerSpec("b2", "blocks.2", "cls_token"), LayerSpec("b2", "blocks.2"),
                                   LayerSpec("penultimate"), LayerSpec("logits")])
    torch.testing.assert_close(out["qkv.none"], seen["qkv"])
    torch.testing.assert_close(out["b2.cls_token"], seen["block"][:, 0])
    torch.testing.assert_close(out["b2"], seen["block"].mean(dim=1))  # avgpool of a token sequence: tokens_mean
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model.head(out["penultimate"]))
    cnn = build_model("torchvision:mobilenet_v3_small", num_classes=4, in_channels=3, image_size=SIZE).eval()
    got = capture_batch(cnn, x, [LayerSpec("b", "body.3.block.0.0", "none")])["b.none"]  # torchvision's features.3...
    assert got.ndim == 4 and got.shape[1] == cnn.get_submodule("body.3.block.0.0").out_channels


def test_token_reductions_on_a_hand_made_tensor():
    t = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # (N=2, S=3 tokens, D=4)
    assert torch.equal(reduce_output(t, "cls_token"), torch.tensor([[0., 1, 2, 3], [12, 13, 14, 15]]))
    assert torch.equal(reduce_output(t, "tokens_mean"), torch.tensor([[4., 5, 6, 7], [16, 17, 18, 19]]))
    assert torch.equal(reduce_output(t, "avgpool", "tokens"), reduce_output(t, "tokens_mean"))
    assert torch.equal(reduce_output(t, "max", "tokens"), torch.tensor([[8., 9, 10, 11], [20, 21, 22, 23]]))
    assert torch.equal(reduce_output(t, "avgpool"), torch.tensor([[1.5, 5.5, 9.5], [13.5, 17.5, 21.5]]))  # as before
    m = torch.arange(2 * 2 * 2 * 3, dtype=torch.float32).reshape(2, 2, 2, 3)  # (N, H=2, W=2, C=3)
    expected = torch.tensor([[4.5, 5.5, 6.5], [16.5, 17.5, 18.5]])
    assert torch.equal(reduce_output(m, "channels_last_avgpool"), expected)
    assert torch.equal(reduce_output(m, "avgpool", "channels_last"), expected)
    assert torch.equal(reduce_output(m, "max", "channels_last"), torch.tensor([[9., 10, 11], [21, 22, 23]]))
    for reduction in ("tokens_mean", "cls_token"):
        with pytest.raises(ValueError, match=r"token sequence \(N, S, D\)"):
            reduce_output(m, reduction)
    with pytest.raises(ValueError, match="token sequence"):
        reduce_output(m, "avgpool", "tokens")
    assert LayerSpec("blocks.3", "blocks.3", "cls_token").column == "blocks.3.cls_token"
    assert LayerSpec("blocks.3", "blocks.3").column == "blocks.3"


def test_default_stage_specs_of_transformers_are_vectors():
    vit = build_model("timm:test_vit", num_classes=4, in_channels=3, image_size=SIZE).eval()
    swin = build_model("torchvision:swin_t", num_classes=4, in_channels=3, image_size=SIZE).eval()
    for model, layout in ((vit, "tokens"), (swin, "channels_last")):
        stages = select_layers(model, preset="blocks")
        assert stages == list(model.stages)
        layout_stages = [s for s in stages if model.output_layout(s) == layout]
        assert layout_stages
        specs = [LayerSpec(s, s) for s in layout_stages] + [LayerSpec(f"{s}_raw", s, "none") for s in layout_stages]
        out = capture_batch(model, _x(), specs)
        for s in layout_stages:
            raw = out[f"{s}_raw.none"]
            dims = (1,) if layout == "tokens" else (1, 2)
            torch.testing.assert_close(out[s], raw.mean(dim=dims))
            assert out[s].shape == (2, raw.shape[-1])
    assert swin.output_layout("permute") is None and swin.output_layout("body.1") == "channels_last"
    assert vit.output_layout("blocks.0") == "tokens"


def test_extracted_token_columns_record_their_layout(tmp_path):
    from ood_core.feature_store import read_features
    from ood_core.hooks import extract_features

    vit = build_model("timm:test_vit", num_classes=4, in_channels=3, image_size=SIZE)
    loader = [(_x(), torch.tensor([0, 1]))]
    layers = [LayerSpec("logits"), LayerSpec("penultimate"), LayerSpec("blocks.5", "blocks.5"),
              LayerSpec("blocks.5", "blocks.5", "cls_token")]
    extract_features(vit, loader, layers, tmp_path / "f.parquet")
    fs = read_features(tmp_path / "f.parquet")
    assert fs.columns["blocks.5"].shape == (2, 64) and fs.columns["blocks.5.cls_token"].shape == (2, 64)
    assert fs.column_meta["blocks.5"]["layout"] == "tokens" and "layout" not in fs.column_meta["penultimate"]


@pytest.mark.parametrize("arch", ["small_cnn", "torchvision:resnet18"])
def test_cnn_columns_and_numbers_unchanged(arch):
    model = build_model(arch, num_classes=4, in_channels=3, image_size=16, seed=0).eval()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][:3]
    assert all(model.output_layout(n) is None for n, _ in model.named_modules())
    specs = [LayerSpec(n, n) for n in convs] + [LayerSpec(n, n, "max") for n in convs] + \
            [LayerSpec(f"{n}_raw", n, "none") for n in convs]
    out = capture_batch(model, _x(size=16), specs)
    for n in convs:  # the channel-first reductions: mean / max over (H, W)
        raw = out[f"{n}_raw.none"]
        assert raw.ndim == 4
        torch.testing.assert_close(out[n], raw.mean(dim=(2, 3)))
        torch.testing.assert_close(out[f"{n}.max"], raw.amax(dim=(2, 3)))
    widths = column_widths(model, [LayerSpec("logits"), LayerSpec("penultimate")] + [LayerSpec(n, n) for n in convs],
                           (3, 16, 16))
    assert set(widths) == {"logits", "penultimate", "feature_maps", *convs}


def test_registry_vit_and_swin_blocks_pool_over_tokens_and_positions():
    from ood_core.hooks import LayerSpec, capture_batch
    from ood_core.models import build_model

    torch.manual_seed(0)
    swin = build_model("swin_t", num_classes=5, in_channels=3, image_size=64, load_weights=False).eval()
    x = torch.randn(2, 3, 64, 64)
    out = capture_batch(swin, x, [LayerSpec("stage", module="body.3"), LayerSpec("stem", module="body.0.0"),
                                  LayerSpec("norm", module="norm")])
    with torch.no_grad():
        maps = swin.body[:4](x)  # (N, H, W, C)
        stem = swin.body[0][0](x)  # (N, C, H, W): the convolution before the permute
        assert torch.allclose(out["stage"], maps.mean(dim=(1, 2)), atol=1e-5)
        assert torch.allclose(out["stem"], stem.mean(dim=(2, 3)), atol=1e-5)
        assert torch.allclose(out["norm"], swin.features(x), atol=1e-5)

    vit = build_model("vit_b_16", num_classes=5, in_channels=3, image_size=224, load_weights=False).eval()
    block = "encoder.layers.encoder_layer_0"
    seen = {}
    handle = vit.get_submodule(block).register_forward_hook(lambda m, i, o: seen.setdefault("t", o.detach()))
    out = capture_batch(vit, torch.randn(1, 3, 224, 224),
                        [LayerSpec("b", module=block), LayerSpec("c", module=block, reduction="cls_token")])
    handle.remove()
    assert torch.allclose(out["b"], seen["t"].mean(dim=1), atol=1e-5)  # (N, S, D) -> mean over the tokens
    assert torch.allclose(out["c.cls_token"], seen["t"][:, 0], atol=1e-6)
