"""Mahalanobis++ and RMDS++ (Müller & Hein, ICML 2025) vs plain float64 loop references, and vs the official
code's logic (unregularised EmpiricalCovariance precisions on l2-normalised features)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ood_core.api import RequiresFitException
from ood_core.detectors import RMD, MahalanobisPP, Mahalanobis, RMDPP
from ood_core.detectors.registry import REGISTRY

from .cases import degenerate_features


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _class_stats(z, y):
    means = {c: z[y == c].mean(axis=0) for c in sorted(set(y.tolist()))}
    cov = np.zeros((z.shape[1], z.shape[1]))
    for i in range(len(z)):
        r = z[i] - means[y[i]]
        cov += np.outer(r, r)
    return means, cov / len(z)


def _ridged_inverse(cov):
    trace = np.trace(cov)
    return np.linalg.inv(cov + np.eye(len(cov)) * 1e-6 * trace / len(cov))


def ref_maha_pp(z_train, y_train, z_test, ridge=True):
    """min_c (u - mu_c)^T P (u - mu_c) on u = z / |z|, P the (ridged) inverse of the pooled within-class
    covariance of the normalised training rows; ``ridge=False``: the official code's plain inverse."""
    z, y = _unit(z_train), np.asarray(y_train)
    means, cov = _class_stats(z, y)
    prec = _ridged_inverse(cov) if ridge else np.linalg.inv(cov)
    return np.array([min(float((u - m) @ prec @ (u - m)) for m in means.values()) for u in _unit(z_test)])


def ref_rmd_pp(z_train, y_train, z_test, ridge=True):
    """Mahalanobis++ minus the normalised rows' distance to the one background Gaussian of all training rows."""
    z = _unit(z_train)
    mu0 = z.mean(axis=0)
    cov0 = (z - mu0).T @ (z - mu0) / len(z)
    prec0 = _ridged_inverse(cov0) if ridge else np.linalg.inv(cov0)
    background = np.array([float((u - mu0) @ prec0 @ (u - mu0)) for u in _unit(z_test)])
    return ref_maha_pp(z_train, y_train, z_test, ridge) - background


@pytest.fixture(scope="module")
def feats():
    """Gaussian classes whose rows have very different norms (the failure case the paper fixes), ID and OOD."""
    g = torch.Generator().manual_seed(3)
    c, d, n = 5, 12, 600
    means = torch.randn(c, d, generator=g) * 3
    y = torch.arange(n) % c
    scale = torch.exp(torch.randn(n, 1, generator=g))  # per-row norm varies by ~e^{+-1}
    z = scale * (means[y] + torch.randn(n, d, generator=g))
    test = torch.cat([torch.exp(torch.randn(60, 1, generator=g)) * (means[torch.arange(60) % c]
                                                                     + torch.randn(60, d, generator=g)),
                      torch.randn(60, d, generator=g) * 3])
    return dict(z=z, y=y, test=test)


@pytest.mark.parametrize("cls,ref", [(MahalanobisPP, ref_maha_pp), (RMDPP, ref_rmd_pp)])
def test_matches_reference(feats, cls, ref):
    want = ref(feats["z"], feats["y"], feats["test"])
    det64 = cls().fit_features(feats["z"].double(), feats["y"])
    np.testing.assert_allclose(det64.predict_features(feats["test"].double()).numpy(), want, rtol=1e-8, atol=1e-8)
    det = cls().fit_features(feats["z"], feats["y"])
    np.testing.assert_allclose(det.predict_features(feats["test"]).double().numpy(), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("cls,ref", [(MahalanobisPP, ref_maha_pp), (RMDPP, ref_rmd_pp)])
def test_agrees_with_the_official_unregularised_inverse(feats, cls, ref):
    """The official code inverts the covariances without a ridge; on full-rank data ours differs by ~1e-6."""
    got = cls().fit_features(feats["z"].double(), feats["y"]).predict_features(feats["test"].double()).numpy()
    np.testing.assert_allclose(got, ref(feats["z"], feats["y"], feats["test"], ridge=False), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls,base", [(MahalanobisPP, Mahalanobis), (RMDPP, RMD)])
def test_is_the_base_detector_on_normalised_rows_and_ignores_row_scale(feats, cls, base):
    z, y, test = feats["z"].double(), feats["y"], feats["test"].double()
    unit = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    ours = cls().fit_features(z, y).predict_features(test)
    torch.testing.assert_close(ours, base().fit_features(unit(z), y).predict_features(unit(test)))
    g = torch.Generator().manual_seed(1)
    rescale = lambda x: x * torch.rand(len(x), 1, generator=g, dtype=x.dtype).add(0.1) * 50  # noqa: E731
    torch.testing.assert_close(cls().fit_features(rescale(z), y).predict_features(rescale(test)), ours)
    # and the plain detector does depend on the row scale
    assert not torch.allclose(base().fit_features(rescale(z), y).predict_features(test),
                              base().fit_features(z, y).predict_features(test))


def test_normalisation_helps_when_norms_vary(feats):
    """ID rows with varied norms: Mahalanobis++ separates ID from OOD better than Mahalanobis."""
    def auroc(s):
        id_s, ood_s = s[:60], s[60:]
        return float((ood_s[:, None] > id_s[None, :]).double().mean())

    plain = Mahalanobis().fit_features(feats["z"], feats["y"]).predict_features(feats["test"])
    pp = MahalanobisPP().fit_features(feats["z"], feats["y"]).predict_features(feats["test"])
    assert auroc(pp) > auroc(plain) and auroc(pp) > 0.9


@pytest.mark.parametrize("cls", [MahalanobisPP, RMDPP])
@pytest.mark.parametrize("case", ["d_gt_n", "low_rank", "partly_constant", "duplicated"])
def test_degenerate_features_give_finite_scores(cls, case):
    z, y = degenerate_features()[0][case]
    test = torch.cat([z[:5], torch.zeros(1, z.shape[1]), 10 * torch.randn(4, z.shape[1])])
    s = cls().fit_features(z, y).predict_features(test)
    assert s.shape == (10,) and torch.isfinite(s).all()


@pytest.mark.parametrize("name", ["MahalanobisPP", "RMDPP"])
def test_registered_without_hyperparameters(name):
    spec = REGISTRY[name]
    assert spec.representation == "features" and not spec.needs_head and spec.cls.parameter_constraints == {}
    with pytest.raises(RequiresFitException, match=name):
        spec.cls().predict_features(torch.randn(3, 4))
