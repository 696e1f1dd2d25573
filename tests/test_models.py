"""Backbone models: the features / head contract and the builder."""
import pytest
import torch

from ood_core.models import ARCHITECTURES, architecture_params, build_model


@pytest.mark.parametrize("in_channels,size,width", [(1, 16, 1.0), (3, 32, 0.5), (3, 7, 1.0)])
def test_small_cnn_contract(in_channels, size, width):
    m = build_model("small_cnn", num_classes=7, in_channels=in_channels, image_size=size, width=width, seed=0).eval()
    x = torch.randn(5, in_channels, size, size)
    z = m.features(x)
    assert z.shape == (5, m.feature_dim) and m.feature_dim == int(round(128 * width))
    assert isinstance(m.head, torch.nn.Linear) and m.head.in_features == m.feature_dim
    assert m.num_classes == 7 and m.head.out_features == 7
    assert torch.allclose(m(x), m.head(z), atol=1e-6)
    names = dict(m.named_modules())
    for n in ("conv1", "bn1", "conv2", "bn2", "pool", "conv3", "bn3", "head"):
        assert n in names


def test_seeded_init_is_reproducible_and_leaves_global_rng():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_model("small_cnn", num_classes=3, in_channels=1, image_size=8, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_model("small_cnn", num_classes=3, in_channels=1, image_size=8, seed=5)
    c = build_model("small_cnn", num_classes=3, in_channels=1, image_size=8, seed=6)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_builder_errors():
    assert "small_cnn" in ARCHITECTURES and architecture_params("small_cnn") == {"width": 1.0}
    with pytest.raises(KeyError, match="unknown architecture 'resnet9000'"):
        build_model("resnet9000", num_classes=3, in_channels=3, image_size=32)
    with pytest.raises(ValueError, match="unknown parameter"):
        build_model("small_cnn", num_classes=3, in_channels=3, image_size=32, depth=3)
    with pytest.raises(ValueError):
        build_model("small_cnn", num_classes=3, in_channels=3, image_size=1)
