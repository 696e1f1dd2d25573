r"""Neural-collapse diagnostics NC1-NC5 of penultimate features (Papyan et al. 2020; NECO 2024).

Notation: ID features :math:`h_i \in R^D` with labels :math:`y_i` (labels < 0 are ignored),
:math:`C` the classes present, class means :math:`\mu_c`, the global mean
:math:`\mu_G = \frac1N \sum_i h_i`, centred means :math:`\tilde\mu_c = \mu_c - \mu_G` and
:math:`\tilde M = [\tilde\mu_1, \dots, \tilde\mu_C] \in R^{D \times C}` (classes as columns, in
ascending label order).

* NC1 (variability collapse) :math:`= \frac1C \operatorname{Tr}(\Sigma_W \Sigma_B^{+})`,
  :math:`\Sigma_W = \frac1N \sum_i (h_i - \mu_{y_i})(h_i - \mu_{y_i})^\top`,
  :math:`\Sigma_B = \frac1C \tilde M \tilde M^\top`; the pseudo-inverse drops singular values of
  :math:`\tilde M` below ``1e-10`` of the largest; NaN when all class means coincide.
* NC2 (simplex ETF) equinorm :math:`= \operatorname{std}_c \lVert\tilde\mu_c\rVert /
  \operatorname{mean}_c \lVert\tilde\mu_c\rVert` (std with Bessel's correction, as in the
  reference code of Papyan et al.); equiangularity :math:`= \operatorname{mean}_{c < c'}
  \lvert\cos(\tilde\mu_c, \tilde\mu_{c'}) + \frac{1}{C-1}\rvert`.
* NC3 (self-duality) :math:`= \lVert W^\top/\lVert W\rVert_F - \tilde M/\lVert\tilde M\rVert_F\rVert_F^2`
  with the head weights :math:`W \in R^{C_{head} \times D}` restricted to the rows of the present
  classes (row :math:`c` of :math:`W` belongs to label :math:`c`).
* NC4 (nearest class centre) = fraction of samples whose nearest class mean (Euclidean) is not
  the network's prediction :math:`\arg\max_c` logits.
* NC5 (ID/OOD orthogonality, NECO) :math:`= \operatorname{mean}_c \lvert\cos(\mu_c, \mu_{OOD})\rvert`
  with the uncentred class means and the mean :math:`\mu_{OOD}` of the OOD features.

All computations are float64 on the device of the features; every metric is 0 for perfect
collapse (NC5: for OOD orthogonal to every class mean).

In a sweep: :class:`CollapseProbe` measures NC1-NC4 after every training epoch on a fixed, class-stratified
subset of ID train (:func:`stratified_subset`); :func:`collapse_summary` gives the final NC1-NC4 on the
whole ID training set and NC5 against each OOD validation set from the cached features.
"""
from __future__ import annotations

import math
import time
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

#: relative singular-value cut-off of the pseudo-inverse in NC1
PINV_RTOL = 1e-10


def _features(name: str, h, dim: Optional[int] = None) -> Tensor:
    h = torch.as_tensor(h)
    if h.ndim != 2:
        raise ValueError(f"neural collapse: {name} must have shape (N, D), got {tuple(h.shape)}")
    if dim is not None and h.shape[1] != dim:
        raise ValueError(f"neural collapse: {name} have dimension {h.shape[1]}, expected {dim}")
    h = h.detach().double()
    if h.numel() and not bool(torch.isfinite(h).all()):
        raise ValueError(f"neural collapse: {name} contain NaN or inf values")
    return h


def _id_set(features, labels) -> Tuple[Tensor, Tensor]:
    h = _features("features", features)
    y = torch.as_tensor(labels, device=h.device)
    if y.ndim != 1 or y.shape[0] != h.shape[0]:
        raise ValueError(f"neural collapse: labels must have shape ({h.shape[0]},), got {tuple(y.shape)}")
    y = y.long()
    known = y >= 0
    h, y = h[known], y[known]
    if h.shape[0] == 0:
        raise ValueError("neural collapse: no in-distribution samples (labels >= 0)")
    return h, y


def class_means(features, labels) -> Tuple[Tensor, Tensor, Tensor]:
    """``(classes (C,), class means (C, D), global mean (D,))`` in float64 (labels < 0 ignored)."""
    h, y = _id_set(features, labels)
    classes, inverse = torch.unique(y, return_inverse=True)
    counts = torch.bincount(inverse, minlength=classes.shape[0]).to(h.dtype)
    means = torch.zeros(classes.shape[0], h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, inverse, h)
    return classes, means / counts[:, None], h.mean(dim=0)


def _need_two(classes: Tensor, what: str) -> None:
    if classes.shape[0] < 2:
        raise ValueError(f"neural collapse: {what} needs at least 2 classes, got {classes.shape[0]}")


def nc1(features, labels) -> float:
    r"""Within-class variability relative to between-class: :math:`\frac1C \operatorname{Tr}(\Sigma_W \Sigma_B^{+})`."""
    h, y = _id_set(features, labels)
    classes, means, glob = class_means(h, y)
    _need_two(classes, "NC1")
    resid = h - means[torch.searchsorted(classes, y)]
    m = (means - glob).T  # (D, C)
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    if not float(s.max()) > 0:  # all class means coincide: no between-class variance
        return float("nan")
    keep = s > PINV_RTOL * float(s.max())
    u, s = u[:, keep], s[keep]
    n_classes = classes.shape[0]
    # Sigma_B^+ = C * U S^-2 U^T, so Tr(Sigma_W Sigma_B^+) = C / N * sum_j ||R u_j||^2 / s_j^2
    proj = resid @ u
    trace = n_classes * float(((proj * proj).sum(dim=0) / (s * s)).sum()) / h.shape[0]
    return trace / n_classes


def nc2(features, labels) -> Tuple[float, float]:
    r"""``(equinorm, equiangularity)`` of the centred class means (0 and 0 for a simplex ETF)."""
    classes, means, glob = class_means(features, labels)
    _need_two(classes, "NC2")
    centred = means - glob
    norms = centred.norm(dim=1)
    equinorm = float(norms.std(unbiased=True) / norms.mean()) if float(norms.mean()) > 0 else float("nan")
    unit = centred / norms.clamp(min=1e-300)[:, None]
    cos = unit @ unit.T
    n_classes = classes.shape[0]
    iu = torch.triu_indices(n_classes, n_classes, offset=1, device=cos.device)
    equiangular = float((cos[iu[0], iu[1]] + 1.0 / (n_classes - 1)).abs().mean())
    return equinorm, equiangular


def nc3(features, labels, w) -> float:
    r"""Self-duality :math:`\lVert W^\top/\lVert W\rVert_F - \tilde M/\lVert\tilde M\rVert_F\rVert_F^2` (in [0, 4])."""
    classes, means, glob = class_means(features, labels)
    _need_two(classes, "NC3")
    w = _features("w", w, dim=means.shape[1]).to(means.device)
    if int(classes.max()) >= w.shape[0]:
        raise ValueError(f"neural collapse: label {int(classes.max())} has no row in w with {w.shape[0]} rows")
    wt = w[classes].T  # (D, C)
    m = (means - glob).T
    return float(((wt / wt.norm() - m / m.norm()) ** 2).sum())


def nc4(features, labels, logits) -> float:
    """Fraction of samples whose nearest class mean disagrees with ``argmax(logits)``."""
    h, y = _id_set(features, labels)
    known = torch.as_tensor(labels, device=h.device).long() >= 0
    logits = _features("logits", logits)
    if logits.shape[0] != known.shape[0]:
        raise ValueError(f"neural collapse: logits must have {known.shape[0]} rows, got {logits.shape[0]}")
    classes, means, _ = class_means(h, y)
    dist = torch.cdist(h, means, compute_mode="donot_use_mm_for_euclid_dist")
    ncc = classes[dist.argmin(dim=1)]
    return float((ncc != logits.to(h.device)[known].argmax(dim=1)).double().mean())


def nc5(features, labels, ood_features) -> float:
    r"""ID/OOD orthogonality :math:`\operatorname{mean}_c \lvert\cos(\mu_c, \mu_{OOD})\rvert`."""
    classes, means, _ = class_means(features, labels)
    ood = _features("ood_features", ood_features, dim=means.shape[1]).to(means.device)
    if ood.shape[0] == 0:
        raise ValueError("neural collapse: NC5 needs at least one OOD sample")
    mu_ood = ood.mean(dim=0)
    cos = (means @ mu_ood) / (means.norm(dim=1) * mu_ood.norm()).clamp(min=1e-300)
    return float(cos.abs().mean())


def neural_collapse_report(features, labels, w=None, b=None, logits=None, ood_features=None) -> Dict[str, float]:
    """NC1-NC5 as a dict of floats: ``nc1``, ``nc2_equinorm``, ``nc2_equiangularity`` always;
    ``nc3`` with the head weights ``w``; ``nc4`` with ``logits`` (or computed as ``features @ w.T + b``);
    ``nc5`` with ``ood_features``.
    """
    full = _features("features", features)
    h, y = _id_set(full, labels)
    known = torch.as_tensor(labels, device=full.device).long() >= 0
    report = {"nc1": nc1(h, y)}
    report["nc2_equinorm"], report["nc2_equiangularity"] = nc2(h, y)
    if w is not None:
        report["nc3"] = nc3(h, y, w)
    if logits is not None:
        logits = _features("logits", logits).to(h.device)
        if logits.shape[0] != known.shape[0]:
            raise ValueError(f"neural collapse: logits must have {known.shape[0]} rows, got {logits.shape[0]}")
        report["nc4"] = nc4(h, y, logits[known])
    elif w is not None:
        logits = h @ _features("w", w, dim=h.shape[1]).to(h.device).T
        if b is not None:
            logits = logits + torch.as_tensor(b).detach().double().to(h.device)
        report["nc4"] = nc4(h, y, logits)
    if ood_features is not None:
        report["nc5"] = nc5(h, y, ood_features)
    return report


# -- neural collapse in a training run and on a sweep's cached features ------------------------------------
#: keys of the NC1-NC4 diagnostics, in the order they are shown
NC_KEYS = ("nc1", "nc2_equinorm", "nc2_equiangularity", "nc3", "nc4")


def stratified_subset(labels, n: int, seed: int) -> np.ndarray:
    """Sorted positions of a fixed, seeded, class-stratified sample of ``n`` of the ``labels`` (all when
    ``n >= len(labels)``): every class keeps its share (largest-remainder rounding of ``n * n_c / N``, ties to the
    smaller label) and its members are drawn by a generator seeded with ``seed``, so the same labels, ``n`` and
    ``seed`` always give the same sample."""
    y = np.asarray(labels).reshape(-1)
    total = y.shape[0]
    if n >= total:
        return np.arange(total)
    classes, counts = np.unique(y, return_counts=True)
    quota = n * counts / total
    take = np.floor(quota).astype(np.int64)
    order = np.lexsort((classes, -(quota - take)))  # largest remainder first, then the smaller label
    take[order[: n - int(take.sum())]] += 1
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(0x4E43,)))
    picked = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def _dataset_labels(dataset) -> np.ndarray:
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        return np.asarray(tensors[1].cpu()).reshape(-1)
    if getattr(dataset, "targets", None) is not None:
        return np.asarray(dataset.targets).reshape(-1)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))])


class CollapseProbe:
    """NC1-NC4 of a classifier on a fixed, class-stratified subset of its training set, measured after each
    epoch (Papyan, Han & Donoho 2020 follow these metrics over training; the probe is what
    :func:`ood_core.training.train_classifier` calls with ``probe=``).

    The subset (:func:`stratified_subset` of ``n_samples``, seeded with ``seed``) is fixed for the whole run, so
    the curves show the network changing, not the sample. A call runs the model in eval mode, in float32, and
    reads the penultimate features and the logits with the same hooks as feature extraction
    (:func:`ood_core.hooks.capture_batch`: the input of ``model.head`` and the model output); NC3 uses
    ``model.head``'s weights. It draws no random numbers and changes no weight or buffer, so training with
    and without the probe ends with the same weights. Returns :data:`NC_KEYS` plus ``nc_seconds`` (the cost of
    the measurement); the metrics are NaN when the features or weights are not finite. The subset's inputs are
    kept in host memory after the first call when they take at most ``cache_bytes``.
    """

    def __init__(self, dataset, n_samples: int, seed: int, batch_size: int = 256, cache_bytes: int = 256 * 2**20):
        if int(n_samples) < 2:
            raise ValueError(f"neural collapse: n_samples must be at least 2, got {n_samples}")
        labels = _dataset_labels(dataset)
        self.indices = stratified_subset(labels, int(n_samples), int(seed))
        self.labels = labels[self.indices]
        if len(set(self.labels.tolist())) < 2:
            raise ValueError(f"neural collapse: the {len(self.indices)} sampled training images hold fewer "
                             "than 2 classes")
        self.dataset, self.batch_size, self.cache_bytes = dataset, int(batch_size), int(cache_bytes)
        self._cached = None

    def _batches(self):
        if self._cached is not None:
            return self._cached
        from torch.utils.data import DataLoader, Subset

        # its own generator: a DataLoader draws a base seed per iterator, never from the global RNG here
        loader = DataLoader(Subset(self.dataset, self.indices.tolist()), batch_size=self.batch_size, shuffle=False,
                            generator=torch.Generator().manual_seed(0))
        batches = [x for x, *_ in loader]
        if sum(x.numel() * x.element_size() for x in batches) <= self.cache_bytes:
            self._cached = batches
        return batches

    def __call__(self, model) -> Dict[str, float]:
        from ood_core.hooks import LayerSpec, capture_batch

        start = time.perf_counter()
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        feats, logits = [], []
        try:
            for x in self._batches():
                x = x.to(device)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                out = capture_batch(model, x, [LayerSpec("penultimate"), LayerSpec("logits")])
                feats.append(out["penultimate"])
                logits.append(out["logits"])
        finally:
            model.train(was_training)
        try:
            report = neural_collapse_report(torch.cat(feats), torch.from_numpy(self.labels),
                                            w=model.head.weight.detach().cpu(), logits=torch.cat(logits))
        except ValueError:  # non-finite features or weights: a diagnostic must not stop the training
            report = {k: math.nan for k in NC_KEYS}
        report["nc_seconds"] = time.perf_counter() - start
        return report


def collapse_summary(features, labels, w=None, b=None, logits=None, ood_sets=None) -> Dict[str, float]:
    """Final NC values of a trained backbone: NC1-NC4 on the ID training features (:func:`neural_collapse_report`;
    NC4 from ``logits``, else from the head ``w``, ``b``) and NC5 (NECO, Ammar et al. 2024) against each named
    OOD set in ``ood_sets`` (``{name: (M, D) features}``) as ``nc5/<name>``, plus ``nc5`` against all of them
    pooled (the mean of their concatenated features)."""
    report = neural_collapse_report(features, labels, w=w, b=b, logits=logits)
    ood_sets = dict(ood_sets or {})
    for name, ood in ood_sets.items():
        report[f"nc5/{name}"] = nc5(features, labels, ood)
    if ood_sets:
        pooled = torch.cat([_features(f"ood_features {name}", ood) for name, ood in ood_sets.items()])
        report["nc5"] = nc5(features, labels, pooled)
    return report
