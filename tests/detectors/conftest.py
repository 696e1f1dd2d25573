"""Fixtures shared by the detector tests."""
import pytest
import torch
from torch import nn


@pytest.fixture(scope="module")
def data():
    """ReLU features of a random layer on Gaussian classes (penultimate-like), a ridge least-squares head
    (trained-like), ID and OOD (broad, no class structure) test rows."""
    g = torch.Generator().manual_seed(11)
    c, d_in, d, n = 6, 24, 48, 900
    means = torch.randn(c, d_in, generator=g) * 2.5
    proj = torch.randn(d_in, d, generator=g) / d_in**0.5

    def feats(x):
        return torch.relu(x @ proj + 0.3)

    y = torch.arange(n) % c
    z = feats(means[y] + torch.randn(n, d_in, generator=g))
    y_test = torch.arange(150) % c
    z_test = torch.cat([feats(means[y_test] + torch.randn(150, d_in, generator=g)),
                        feats(torch.randn(150, d_in, generator=g) * 3.0)])
    onehot = torch.nn.functional.one_hot(y, c).double() * 4 - 2
    zb = torch.cat([z, torch.ones(n, 1)], dim=1).double()
    sol = torch.linalg.solve(zb.T @ zb + 50.0 * torch.eye(d + 1, dtype=torch.float64), zb.T @ onehot).float()
    w, b = sol[:-1].T.contiguous(), sol[-1].contiguous()
    lin = nn.Linear(d, c)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return dict(z=z, y=y, z_test=z_test, w=w, b=b, lin=lin)
