"""Neural-collapse diagnostics NC1-NC5 on constructed inputs with known answers and vs plain references."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ood_core.neural_collapse import class_means, nc1, nc2, nc3, nc4, nc5, neural_collapse_report


def simplex_etf(c, d, scale=3.0, offset=None, seed=0):
    """Centred means of a simplex ETF (C, D) embedded by a random orthonormal basis, plus the offset."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    m = math.sqrt(c / (c - 1)) * (torch.eye(c, dtype=torch.float64) - 1.0 / c)  # columns: ETF vectors
    centred = scale * (basis[:, :c] @ m).T  # (C, D), rows span a (C-1)-dim subspace of the first C basis vectors
    glob = torch.zeros(d, dtype=torch.float64) if offset is None else offset * basis[:, c]  # orthogonal to the ETF
    return centred, glob, basis


def collapsed(c=5, d=8, per_class=7, offset=2.0):
    centred, glob, basis = simplex_etf(c, d, offset=offset)
    y = torch.arange(c * per_class) % c
    h = glob + centred[y]
    return h, y, centred, glob, basis


# -- references (loops, numpy float64) -----------------------------------------------------------------
def ref_nc(h, y, w=None):
    h, y = np.asarray(h, np.float64), np.asarray(y)
    classes = sorted(set(y.tolist()))
    c, (n, d) = len(classes), h.shape
    glob = h.mean(axis=0)
    means = {k: h[y == k].mean(axis=0) for k in classes}
    sw = sum(np.outer(x - means[k], x - means[k]) for x, k in zip(h, y)) / n
    sb = sum(np.outer(means[k] - glob, means[k] - glob) for k in classes) / c
    out = {"nc1": np.trace(sw @ np.linalg.pinv(sb, rcond=1e-10, hermitian=True)) / c}
    norms = [np.linalg.norm(means[k] - glob) for k in classes]
    out["nc2_equinorm"] = np.std(norms, ddof=1) / np.mean(norms)
    devs = []
    for a, b in itertools.combinations(classes, 2):
        ua, ub = means[a] - glob, means[b] - glob
        devs.append(abs(ua @ ub / (np.linalg.norm(ua) * np.linalg.norm(ub)) + 1 / (c - 1)))
    out["nc2_equiangularity"] = np.mean(devs)
    if w is not None:
        wt = np.asarray(w, np.float64)[classes].T
        mt = np.stack([means[k] - glob for k in classes], axis=1)
        out["nc3"] = np.sum((wt / np.linalg.norm(wt) - mt / np.linalg.norm(mt)) ** 2)
    return out


# -- known answers -------------------------------------------------------------------------------------
def test_perfect_simplex_etf_with_aligned_head_is_fully_collapsed():
    h, y, centred, glob, basis = collapsed()
    w = 4.0 * centred  # row c of W is the centred mean of class c (self-duality up to scale)
    logits = h @ w.T + 1.0
    assert torch.equal(logits.argmax(dim=1), y)
    report = neural_collapse_report(h, y, w=w, b=torch.ones(5), ood_features=basis[:, 7][None])
    assert set(report) == {"nc1", "nc2_equinorm", "nc2_equiangularity", "nc3", "nc4", "nc5"}
    for key in ("nc1", "nc2_equinorm", "nc2_equiangularity", "nc3", "nc4"):
        assert report[key] == pytest.approx(0.0, abs=1e-10), key
    report32 = neural_collapse_report(h.float(), y, w=w.float(), b=torch.ones(5))  # float32 rounding only
    for key in ("nc1", "nc2_equinorm", "nc2_equiangularity", "nc3", "nc4"):
        assert report32[key] == pytest.approx(0.0, abs=1e-6), key
    assert report["nc5"] > 0  # the class means share the offset glob, which the OOD direction is orthogonal to...
    h0, y0, *_ = collapsed(offset=0.0)
    assert nc5(h0, y0, basis[:, 7][None]) == pytest.approx(0.0, abs=1e-12)  # ...without offset: orthogonal


def test_known_nonzero_answers():
    h, y, centred, glob, basis = collapsed(offset=0.0)
    assert nc3(h, y, -centred) == pytest.approx(4.0)  # anti-aligned head: ||-a - a||^2 with ||a||_F = 1
    assert nc3(h, y, 0.1 * centred) == pytest.approx(0.0, abs=1e-12)  # scale invariant
    # OOD mean = the mean of class 0: |cos| = 1 for class 0 and 1/(C-1) for the others -> 2/C
    assert nc5(h, y, h[y == 0]) == pytest.approx(2 / 5)
    # a network that always predicts the next class disagrees with the nearest centre everywhere
    shifted = torch.nn.functional.one_hot((y + 1) % 5, 5).double()
    assert nc4(h, y, shifted) == pytest.approx(1.0)
    half = torch.where((torch.arange(len(y)) % 2 == 0)[:, None], shifted, torch.nn.functional.one_hot(y, 5).double())
    assert nc4(h, y, half) == pytest.approx((torch.arange(len(y)) % 2 == 0).double().mean().item())
    noisy = h + 0.3 * torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert nc1(noisy, y) == pytest.approx(ref_nc(noisy, y)["nc1"], rel=1e-8)
    # two classes at +-e1 with spread only along e1: Sigma_W = v e1e1^T, Sigma_B = e1e1^T -> NC1 = v / 2
    y2 = torch.tensor([0, 0, 1, 1])
    h2 = torch.tensor([[0.5, 0.0], [1.5, 0.0], [-0.5, 0.0], [-1.5, 0.0]], dtype=torch.float64)
    assert nc1(h2, y2) == pytest.approx(0.25 / 2)
    assert nc2(h2, y2) == pytest.approx((0.0, 0.0), abs=1e-12)


def test_unequal_norms_and_angles():
    # class means at e1, 2 e2, -e1 - 2 e2 (global mean 0): norms 1, 2, sqrt(5)
    means = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    y = torch.arange(3)
    equinorm, equiangular = nc2(means, y)
    norms = np.array([1.0, 2.0, math.sqrt(5)])
    assert equinorm == pytest.approx(np.std(norms, ddof=1) / norms.mean())
    cosines = [0.0, -1 / math.sqrt(5), -4 / (2 * math.sqrt(5))]
    assert equiangular == pytest.approx(np.mean([abs(c + 0.5) for c in cosines]))


# -- vs references on random data ----------------------------------------------------------------------
@pytest.mark.parametrize("n,d,c", [(120, 10, 4), (30, 50, 3), (200, 6, 6)])
def test_metrics_match_reference(n, d, c):
    g = torch.Generator().manual_seed(n + d)
    means = torch.randn(c, d, generator=g) * 2
    y = torch.arange(n) % c
    h = (means[y] + torch.randn(n, d, generator=g)).float()
    w = torch.randn(c + 2, d, generator=g)  # the head may have more rows than classes present
    ref = ref_nc(h, y, w)
    got = neural_collapse_report(h, y, w=w)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    logits = h.double() @ w.double().T
    centres = np.stack([h[y == k].double().mean(0).numpy() for k in range(c)])
    ncc = [int(np.argmin([np.linalg.norm(x - m) for m in centres])) for x in h.double().numpy()]
    assert got["nc4"] == pytest.approx(np.mean(np.array(ncc) != logits.argmax(1).numpy()))
    ood = torch.randn(40, d, generator=g) + 3
    cos = [abs(m @ ood.double().mean(0).numpy()) / np.linalg.norm(m) / np.linalg.norm(ood.double().mean(0).numpy())
           for m in centres]
    assert nc5(h, y, ood) == pytest.approx(np.mean(cos))


def test_invariances_and_ignored_labels():
    g = torch.Generator().manual_seed(3)
    y = torch.arange(90) % 3
    h = torch.randn(3, 7, generator=g)[y] * 3 + torch.randn(90, 7, generator=g)
    base = neural_collapse_report(h, y)
    scaled = neural_collapse_report(10 * h + 5, y)  # NC1 and NC2 are invariant to scale and shift
    for key in base:
        assert scaled[key] == pytest.approx(base[key], rel=1e-6)
    ood_rows = torch.randn(20, 7, generator=g) * 100
    with_ood = neural_collapse_report(torch.cat([h, ood_rows]), torch.cat([y, -torch.ones(20, dtype=torch.long)]),
                                      logits=torch.cat([h, ood_rows])[:, :3])
    for key in base:
        assert with_ood[key] == pytest.approx(base[key], rel=1e-9)
    assert with_ood["nc4"] == pytest.approx(nc4(h, y, h[:, :3]))
    classes, means, glob = class_means(h, y)
    assert classes.tolist() == [0, 1, 2] and means.dtype == torch.float64
    torch.testing.assert_close(glob, h.double().mean(0))


def test_degenerate_and_invalid_inputs():
    y = torch.arange(12) % 3
    same = torch.ones(12, 4)
    assert math.isnan(nc1(same, y))  # no between-class variance
    with pytest.raises(ValueError, match="at least 2 classes"):
        nc1(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have shape"):
        nc1(torch.randn(5, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN or inf"):
        nc2(torch.full((12, 3), float("nan")), y)
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        nc1(torch.randn(12), y)
    with pytest.raises(ValueError, match="no row in w"):
        nc3(torch.randn(12, 3), y, torch.randn(2, 3))
    with pytest.raises(ValueError, match="dimension"):
        nc3(torch.randn(12, 3), y, torch.randn(3, 4))
    with pytest.raises(ValueError, match="no in-distribution"):
        nc2(torch.randn(12, 3), -torch.ones(12, dtype=torch.long))
    with pytest.raises(ValueError, match="logits must have 12 rows"):
        neural_collapse_report(torch.randn(12, 3), y, logits=torch.randn(5, 3))
    with pytest.raises(ValueError, match="at least one OOD sample"):
        nc5(torch.randn(12, 3), y, torch.randn(0, 3))
