"""ASH, SCALE, VRA, RankFeat vs plainly written references (numpy float64, loops) and pytorch-ood 0.4.0;
their constructors (pytorch-ood's positional order and names, percent units).

Agreement with pytorch-ood (feature maps, head = global average pooling + the same linear layer):
ASH (all variants), SCALE, VRA (``per_dimension=True, below="clip"``, percentiles x 100), RankFeat (svd):
equal scores (Spearman 1.0).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from torch import nn

from ood_core.api import DetectorError, InvalidInputError, RequiresFitException
from ood_core.constraints import ParameterError
from ood_core.detectors import (ASH, SCALE, VRA, MaxLogit, RankFeat, build_detector, fit_detector, get_spec,
                                score_detector)


# -- references (numpy float64, loops) ---------------------------------------------------------------
def ref_energy(logits):
    out = []
    for row in logits:
        m = max(row)
        out.append(-(m + math.log(sum(math.exp(v - m) for v in row))))
    return np.array(out)


def ref_head(shaped_sample, w, b):
    """Pool (mean over space when the sample is C x H x W), then w @ z + b."""
    a = np.asarray(shaped_sample, np.float64)
    z = a.reshape(a.shape[0], -1).mean(axis=1) if a.ndim == 3 else a
    return np.asarray(w, np.float64) @ z + np.asarray(b, np.float64)


def ref_ash_sample(a, percentile, variant):
    flat = np.asarray(a, np.float64).ravel()
    n = len(flat)
    k = max(1, n - int(round(n * percentile / 100.0)))
    keep = sorted(range(n), key=lambda j: -flat[j])[:k]
    out = np.zeros(n)
    s1 = flat.sum()
    for j in keep:
        out[j] = flat[j]
    if variant == "ash-b":
        for j in keep:
            out[j] = s1 / k
    if variant == "ash-s":
        s2 = sum(flat[j] for j in keep)
        out = out * math.exp(s1 / s2)
    return out.reshape(np.shape(a))


def ref_scale_sample(a, percentile):
    flat = np.asarray(a, np.float64).ravel()
    n = len(flat)
    k = max(1, n - int(round(n * percentile / 100.0)))
    s2 = sum(sorted(flat, reverse=True)[:k])
    return np.asarray(a, np.float64) * math.exp(flat.sum() / s2)


def ref_vra_sample(a, lo, hi, below="zero"):
    a = np.asarray(a, np.float64)
    out = np.minimum(a, hi)
    return np.where(a < lo, lo if below == "clip" else 0.0, out)


def ref_rankfeat_sample(a):
    a = np.asarray(a, np.float64)
    m = a.reshape(a.shape[0], -1)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (m - s[0] * np.outer(u[:, 0], vt[0])).reshape(a.shape)


def ref_scores(x, w, b, shape_fn):
    return ref_energy([ref_head(shape_fn(sample), w, b) for sample in np.asarray(x, np.float64)])


# -- data --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    k, c = 5, 8
    # positive, tie-free activations (with ReLU zeros, which of the tied zeros ASH keeps is arbitrary)
    maps = torch.nn.functional.softplus(2 * torch.randn(30, c, 4, 4, generator=g))
    maps[::3] *= 3.0  # some samples with larger activations
    feats = torch.nn.functional.softplus(2 * torch.randn(30, 16, generator=g))
    ood = torch.nn.functional.softplus(4 * torch.randn(10, c, 4, 4, generator=g))
    w, b = torch.randn(k, c, generator=g), torch.randn(k, generator=g)
    w16 = torch.randn(k, 16, generator=g)
    y = torch.arange(30) % k
    return dict(maps=maps, feats=feats, ood=ood, w=w, b=b, w16=w16, y=y)


def _linear(w, b):
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


@pytest.mark.parametrize("variant", ["ash-p", "ash-b", "ash-s"])
@pytest.mark.parametrize("percentile", [2, 65, 90])
def test_ash_matches_reference(data, variant, percentile):
    for x, w in ((data["maps"], data["w"]), (data["feats"], data["w16"])):
        det = ASH(head=(w, data["b"]), percentile=percentile, variant=variant)
        got = det.predict_feature_maps(x) if x.ndim == 4 else det.predict_features(x)
        ref = ref_scores(x, w, data["b"], lambda a: ref_ash_sample(a, percentile, variant))
        np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("percentile", [65, 85, 95])
def test_scale_matches_reference(data, percentile):
    for x, w in ((data["maps"], data["w"]), (data["feats"], data["w16"])):
        det = SCALE(head=_linear(w, data["b"]), percentile=percentile)
        got = det.predict_feature_maps(x) if x.ndim == 4 else det.predict_features(x)
        ref = ref_scores(x, w, data["b"], lambda a: ref_scale_sample(a, percentile))
        np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-4, atol=1e-4)


def test_ash_on_pooled_features_equals_one_by_one_maps(data):
    det = ASH(head=(data["w16"], data["b"]), percentile=70)
    torch.testing.assert_close(det.predict_features(data["feats"]),
                               det.predict_feature_maps(data["feats"][:, :, None, None]))


@pytest.mark.parametrize("per_dimension", [False, True])
@pytest.mark.parametrize("below", ["zero", "clip"])
def test_vra_matches_reference(data, per_dimension, below):
    for x, w in ((data["maps"], data["w"]), (data["feats"], data["w16"])):
        det = VRA(head=(w, data["b"]), lower_percentile=40, upper_percentile=90, per_dimension=per_dimension,
                  below=below)
        if x.ndim == 4:
            det.fit_feature_maps(x, data["y"])
        else:
            det.fit_features(x, data["y"])
        xn = x.double().numpy()
        axis = 0 if per_dimension else None
        lo, hi = np.percentile(xn, 40, axis=axis), np.percentile(xn, 90, axis=axis)
        test = torch.cat([x[:8], 2 * x[8:12]])
        got = det.predict_feature_maps(test) if x.ndim == 4 else det.predict_features(test)
        ref = ref_scores(test, w, data["b"], lambda a: ref_vra_sample(a, lo, hi, below))
        np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-4, atol=1e-4)


def test_vra_ignores_ood_labels_in_fit(data):
    x, y = data["feats"], data["y"].clone()
    y[:10] = -1
    a = VRA(head=(data["w16"], data["b"])).fit_features(x, y)
    b = VRA(head=(data["w16"], data["b"])).fit_features(x[10:], y[10:])
    assert a.lower_ == b.lower_ and a.upper_ == b.upper_


def test_rankfeat_matches_reference(data):
    det = RankFeat(head=(data["w"], data["b"]))
    got = det.predict_feature_maps(data["maps"]).double().numpy()
    ref = ref_scores(data["maps"], data["w"], data["b"], ref_rankfeat_sample)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    power = RankFeat(head=(data["w"], data["b"]), method="power", iterations=100).predict_feature_maps(data["maps"])
    np.testing.assert_allclose(power.double().numpy(), ref, rtol=1e-3, atol=1e-3)


def test_rankfeat_needs_feature_maps(data):
    with pytest.raises(InvalidInputError, match="RankFeat"):
        RankFeat(head=(data["w16"], data["b"])).predict_features(data["feats"])


def test_other_logit_scores(data):
    det = ASH(head=(data["w"], data["b"]), percentile=80, variant="ash-p", detector="maxlogit")
    logits = [ref_head(ref_ash_sample(a, 80, "ash-p"), data["w"], data["b"]) for a in data["maps"].double().numpy()]
    np.testing.assert_allclose(det.predict_feature_maps(data["maps"]).double().numpy(),
                               [-max(l) for l in logits], rtol=1e-5, atol=1e-5)


# -- pytorch-ood ---------------------------------------------------------------------------------------
def _pod_head(w, b):
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), _linear(w, b))


def _agree(ours, theirs, rtol=1e-5, atol=1e-5):
    from scipy.stats import spearmanr

    ours, theirs = ours.double().numpy(), np.asarray(theirs, np.float64)
    assert spearmanr(ours, theirs).statistic >= 0.999
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=atol)


@pytest.mark.parametrize("variant", ["ash-p", "ash-b", "ash-s"])
@pytest.mark.parametrize("percentile", [65, 90])
def test_ash_vs_pytorch_ood(data, variant, percentile):
    pod = pytest.importorskip("pytorch_ood.detector")
    x = torch.cat([data["maps"], data["ood"]])
    theirs = pod.ASH(backbone=None, head=_pod_head(data["w"], data["b"]), variant=variant,
                     percentile=percentile / 100).predict_feature_maps(x)
    ours = ASH(head=(data["w"], data["b"]), percentile=percentile, variant=variant).predict_feature_maps(x)
    _agree(ours, theirs)


@pytest.mark.parametrize("percentile", [65, 90])
def test_scale_vs_pytorch_ood(data, percentile):
    pod = pytest.importorskip("pytorch_ood.detector")
    x = torch.cat([data["maps"], data["ood"]])
    theirs = pod.SCALE(backbone=None, head=_pod_head(data["w"], data["b"]),
                       percentile=percentile / 100).predict_feature_maps(x)
    _agree(SCALE(head=(data["w"], data["b"]), percentile=percentile).predict_feature_maps(x), theirs)


@pytest.mark.parametrize("lower,upper", [(1, 99), (10, 90)])
def test_vra_vs_pytorch_ood(data, lower, upper):
    pod = pytest.importorskip("pytorch_ood.detector")
    theirs = pod.VRA(backbone=None, head=_pod_head(data["w"], data["b"]), lower_percentile=lower / 100,
                     upper_percentile=upper / 100)
    theirs.fit_feature_maps(data["maps"], data["y"])
    ours = VRA(head=(data["w"], data["b"]), lower_percentile=lower, upper_percentile=upper, per_dimension=True,
               below="clip").fit_feature_maps(data["maps"], data["y"])
    torch.testing.assert_close(ours.lower_, theirs._lower_threshold, rtol=1e-5, atol=1e-6)
    x = torch.cat([data["maps"], data["ood"]])
    _agree(ours.predict_feature_maps(x), theirs.predict_feature_maps(x))


def test_rankfeat_vs_pytorch_ood(data):
    pod = pytest.importorskip("pytorch_ood.detector")
    x = torch.cat([data["maps"], data["ood"]])
    theirs = pod.RankFeat(backbone=None, head=_pod_head(data["w"], data["b"])).predict_feature_maps(x)
    _agree(RankFeat(head=(data["w"], data["b"])).predict_feature_maps(x), theirs, rtol=1e-4, atol=1e-4)


def test_pytorch_ood_positional_signatures(data):
    """Each detector built the pytorch-ood way (backbone, head = pooling + linear, positional parameters in
    their order, a pytorch-ood scoring function) gives pytorch-ood's scores through ``predict``."""
    pod = pytest.importorskip("pytorch_ood.detector")
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    head = _pod_head(data["w"], data["b"])
    x = torch.randn(12, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    y = torch.arange(12) % 5
    pairs = [
        (ASH(backbone, head, "ash-b", 70, pod.EnergyBased.score), pod.ASH(backbone, head, "ash-b", 0.7,
                                                                            pod.EnergyBased.score)),
        (ASH(backbone=backbone, head=head, variant="ash-p", percentile=80, detector=pod.MaxLogit.score),
         pod.ASH(backbone=backbone, head=head, variant="ash-p", percentile=0.8, detector=pod.MaxLogit.score)),
        (SCALE(backbone, head, 85, pod.MaxSoftmax.score), pod.SCALE(backbone, head, 0.85, pod.MaxSoftmax.score)),
        (VRA(backbone, head, 5, 95, pod.EnergyBased.score, True, "clip"),
         pod.VRA(backbone, head, 0.05, 0.95, pod.EnergyBased.score)),
        (RankFeat(backbone, head, pod.EnergyBased.score), pod.RankFeat(backbone, head, pod.EnergyBased.score)),
    ]
    for ours, theirs in pairs:
        if isinstance(ours, VRA):
            ours.fit([(x, y)])
            theirs.fit([(x, y)])
        with torch.no_grad():
            _agree(ours.predict(x), theirs.predict(x))


def test_scoring_function_as_callable(data):
    det = ASH(head=(data["w"], data["b"]), percentile=80, variant="ash-p", detector="maxlogit")
    for fn in (MaxLogit.score, MaxLogit(), lambda logits: -logits.amax(dim=1)):
        same = ASH(head=(data["w"], data["b"]), percentile=80, variant="ash-p", detector=fn)
        torch.testing.assert_close(same.predict_feature_maps(data["maps"]), det.predict_feature_maps(data["maps"]))


# -- batch independence, robustness, registry ---------------------------------------------------------------
def _all(data, maps=True):
    w = data["w"] if maps else data["w16"]
    x = data["maps"] if maps else data["feats"]
    dets = [ASH(head=(w, data["b"]), variant=v) for v in ASH.VARIANTS] + [SCALE(head=(w, data["b"]))]
    dets.append(VRA(head=(w, data["b"])).fit_feature_maps(x, data["y"]) if maps
                else VRA(head=(w, data["b"]), per_dimension=True).fit_features(x, data["y"]))
    if maps:
        dets.append(RankFeat(head=(w, data["b"])))
    return dets, x


@pytest.mark.parametrize("maps", [True, False])
def test_batch_independence(data, maps):
    dets, x = _all(data, maps)
    for det in dets:
        score = det.predict_feature_maps if maps else det.predict_features
        full = score(x)
        parts = torch.cat([score(x[i:i + 7]) for i in range(0, len(x), 7)])
        torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(score(x.flip(0)).flip(0), full, rtol=1e-5, atol=1e-5)


def test_invalid_inputs_name_the_detector(data):
    dets, x = _all(data, maps=True)
    bad = x.clone()
    bad[2, 1, 0, 0] = float("nan")
    inf = x.clone()
    inf[0, 0, 0, 0] = float("inf")
    for det in dets:
        name = type(det).__name__
        for z in (bad, inf, x[0], x[:, :3]):
            with pytest.raises(InvalidInputError, match=name):
                det.predict_feature_maps(z)
    with pytest.raises(RequiresFitException, match="VRA"):
        VRA(head=(data["w"], data["b"])).predict_feature_maps(x)
    with pytest.raises(InvalidInputError, match="VRA"):
        VRA(head=(data["w"], data["b"]), per_dimension=True).fit_feature_maps(x, data["y"]).predict_feature_maps(
            x[:, :, :2, :2])
    with pytest.raises(InvalidInputError, match="no in-distribution"):
        VRA(head=(data["w"], data["b"])).fit_feature_maps(x, -torch.ones(len(x), dtype=torch.long))
    with pytest.raises(DetectorError, match="ASH: needs the classifier head"):
        ASH().predict_features(data["feats"])


def test_parameter_errors(data):
    head = (data["w"], data["b"])
    with pytest.raises(ParameterError, match=r"ASH: percentile=101 must be in \(1, 100\]"):
        ASH(head=head, percentile=101)
    with pytest.raises(ParameterError, match="ASH: variant='ash-x' must be one of 'ash-p', 'ash-b', 'ash-s'"):
        ASH(head=head, variant="ash-x")
    with pytest.raises(ParameterError, match=r"SCALE: percentile=-1 must be in \(1, 100\]"):
        SCALE(head=head, percentile=-1)
    with pytest.raises(ParameterError, match="VRA: lower_percentile=95 must not exceed upper_percentile=90"):
        VRA(head=head, lower_percentile=95, upper_percentile=90)
    with pytest.raises(ParameterError, match="RankFeat: method='qr' must be one of 'svd', 'power'"):
        RankFeat(head=head, method="qr")
    with pytest.raises(ParameterError, match="RankFeat: iterations=0 must be in"):
        RankFeat(head=head, iterations=0)
    with pytest.raises(ParameterError, match="VRA: below='none' must be one of 'zero', 'clip'"):
        VRA(head=head, below="none")
    with pytest.raises(ParameterError, match="SCALE: detector=3 must be one of 'energy', 'msp', 'maxlogit'"):
        SCALE(head=head, detector=3)
    with pytest.raises(ValueError, match="head weights"):
        ASH(head=(data["b"], data["b"]))
    ASH(head=head, percentile=100)  # keeps the largest activation only
    VRA(head=head, lower_percentile=1, upper_percentile=1.5)  # the 1st percentile (pytorch-ood's 0.01)


@pytest.mark.parametrize("make,name,value", [
    (lambda h, v: ASH(head=h, percentile=v), "percentile", 0.65),
    (lambda h, v: ASH(None, h, "ash-s", v), "percentile", 0.9),
    (lambda h, v: SCALE(None, h, v), "percentile", 0.65),
    (lambda h, v: VRA(head=h, upper_percentile=v), "upper_percentile", 0.99),
    (lambda h, v: VRA(head=h, upper_percentile=v), "upper_percentile", 1.0),
])
def test_fractions_are_refused_with_the_hint(data, make, name, value):
    with pytest.raises(ParameterError, match=rf"{name}={value!r} must be in \(1, 100\]; it is in percent: "
                                             rf"write {name}=90 for the 90th percentile \(pytorch-ood's {name}=0.9\)"):
        make((data["w"], data["b"]), value)


@pytest.mark.parametrize("value", [0.01, 0.5, 0])
def test_vra_lower_fraction_is_refused_with_the_hint(data, value):
    with pytest.raises(ParameterError, match=rf"VRA: lower_percentile={value!r} must be in \[1, 100\]; it is in "
                                             r"percent: write lower_percentile=1 for the 1st percentile"):
        VRA(head=(data["w"], data["b"]), lower_percentile=value)


def test_contract_declarations():
    assert [n for n, p in ASH.parameter_constraints.items() if p.structural] == []
    assert [n for n, p in SCALE.parameter_constraints.items() if p.structural] == []
    assert [n for n, p in RankFeat.parameter_constraints.items() if p.structural] == []
    assert [n for n, p in VRA.parameter_constraints.items() if p.structural] == ["lower_percentile",
                                                                               "upper_percentile", "per_dimension"]
    assert ASH.representation == SCALE.representation == VRA.representation == "features"
    assert RankFeat.representation == "feature_maps"
    assert all(c.needs_head and not c.needs_outliers for c in (ASH, SCALE, VRA, RankFeat))
    assert VRA.requires_fit and not (ASH.requires_fit or SCALE.requires_fit or RankFeat.requires_fit)


def test_constant_and_duplicated_inputs_are_finite(data):
    w, b = data["w"], data["b"]
    cases = [torch.zeros(6, 8, 4, 4), torch.ones(6, 8, 4, 4), -torch.ones(6, 8, 4, 4),
             data["maps"][:1].repeat(6, 1, 1, 1)]
    for x in cases:
        y = torch.zeros(6, dtype=torch.long)
        dets = [ASH(head=(w, b), variant=v, percentile=90) for v in ASH.VARIANTS] + [
            SCALE(head=(w, b)), RankFeat(head=(w, b)), RankFeat(head=(w, b), method="power"),
            VRA(head=(w, b)).fit_feature_maps(x, y), VRA(head=(w, b), per_dimension=True).fit_feature_maps(x, y)]
        for det in dets:
            s = det.predict_feature_maps(x)
            assert s.shape == (6,) and torch.isfinite(s).all(), (type(det).__name__, x[0, 0, 0, 0])


def test_float64_and_device_follow_input(data):
    det = ASH(head=(data["w"], data["b"]))
    assert det.predict_feature_maps(data["maps"].double()).dtype == torch.float64
    vra = VRA(head=(data["w"], data["b"]), per_dimension=True).fit_feature_maps(data["maps"], data["y"])
    assert vra.to("meta").lower_.device.type == "meta" and vra.w.device.type == "meta"


def test_registry_dispatch(data):
    assert get_spec("ash").representation == "features" and get_spec("RankFeat").representation == "feature_maps"
    assert get_spec("ASH").search_space == {"percentile": {"grid": [65, 70, 75, 80, 85, 90, 95]}}
    reps = {"features": data["feats"].numpy(), "feature_maps": data["maps"].numpy()}
    head16 = (data["w16"], data["b"])
    for name, params, head in (("ASH", {"percentile": 90, "variant": "ash-b"}, head16), ("SCALE", {}, head16),
                               ("VRA", {"lower_percentile": 50}, head16), ("RankFeat", {}, (data["w"], data["b"]))):
        det = build_detector(name, params, head=head)
        fit_detector(det, reps, data["y"].numpy())
        s = score_detector(det, reps)
        assert s.shape == (30,) and torch.isfinite(s).all()
    with pytest.raises(ValueError, match="RankFeat: needs the classifier head"):
        build_detector("RankFeat", {})


def test_predict_with_model(data):
    backbone = torch.nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    det = ASH(model=backbone, head=(data["w"], data["b"]))
    with torch.no_grad():
        torch.testing.assert_close(det.predict(x), det.predict_feature_maps(backbone(x)))
    vra = VRA(model=backbone, head=(data["w"], data["b"])).fit([(x, torch.zeros(5, dtype=torch.long))])
    assert vra.upper_ is not None and vra.predict(x).shape == (5,)
