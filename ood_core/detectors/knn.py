"""Nearest-neighbour detectors on penultimate features: KNN and NNGuide.

Both search a bank of ID training features exactly; the search lives in :mod:`.neighbour_search`.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Mapping, Optional

import torch
from torch import Tensor

from ..api import FeaturesDetector
from ..constraints import Boolean, Interval, N, Param
from .head import Head, HeadMixin
from .neighbour_search import kth_nearest_distance, top_k_mean_similarity


def normalise(z: Tensor) -> Tensor:
    """Rows of ``z`` scaled to unit L2 norm (zero rows stay zero)."""
    return z / z.norm(dim=1, keepdim=True).clamp(min=1e-12)


class KNN(FeaturesDetector):
    r"""Deep nearest neighbours: distance to the :math:`k`-th nearest ID training feature.

    .. math::
        s(x) = \lVert \hat z - \hat z_{(k)} \rVert_2, \qquad \hat z = z / \lVert z \rVert_2

    where :math:`\hat z_{(k)}` is the :math:`k`-th nearest of the normalised ID training features
    (``normalize=False``: the raw features, :math:`\hat z = z`). The search is exact, in bounded memory,
    on the device of the input (:func:`~.neighbour_search.kth_nearest_distance`).

    Paper: Sun, Ming, Zhu & Li, "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022
    (arXiv:2204.06507); code github.com/deeplearning-wisc/knn-ood.

    Search space: OpenOOD's grid :math:`k \in \{50, 100, 200, 500, 1000\}` without the values above
    :math:`N`; when none fits (:math:`N < 50`), :math:`k \in \{1, 5, 10, 20\}` up to :math:`N` (the
    constructor's default ``k=50`` needs :math:`N \ge 50`: ``fit`` refuses it otherwise, naming the bound).

    pytorch-ood 0.4.0: ``KNN(encoder, k=50, normalize=True, **knn_kwargs)`` — the same positional order and
    names here (``encoder=`` for ``model``). Differences: pytorch-ood searches with scikit-learn's
    ``NearestNeighbors`` on the CPU and passes ``knn_kwargs`` to it; here the search is our exact torch engine
    on the input's device, and ``knn_kwargs`` are not accepted.

    :param model: optional callable returning penultimate features (for ``fit``/``predict``)
    :param k: neighbour rank, :math:`1 \le k \le N` (checked in ``fit``)
    :param normalize: L2-normalise the features first (the paper's choice)
    """

    requires_fit: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "k": Param(Interval(int, 1, N), structural=False, doc="neighbour rank (distance to the k-th nearest)"),
        "normalize": Param(Boolean(), doc="L2-normalise the features (the bank is stored normalised)"),
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"k": {"grid": [50, 100, 200, 500, 1000]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, k: int = 50, normalize: bool = True):
        super().__init__(model)
        self.k = k
        self.normalize = normalize

    @classmethod
    def search_space(cls, data: Optional[Mapping[str, int]] = None) -> Dict[str, Any]:
        space = super().search_space(data)
        if data and data.get("N") and "k" not in space:  # N < 50: no value of OpenOOD's grid fits
            space["k"] = {"grid": [k for k in (1, 5, 10, 20) if k <= data["N"]]}
        return space

    def _fit(self, z: Tensor, y: Tensor) -> None:
        self.bank = normalise(z) if self.normalize else z.clone()  #: ID training features, (N, D)

    def _score(self, z: Tensor) -> Tensor:
        q = normalise(z) if self.normalize else z
        return kth_nearest_distance(q, self.bank.to(q), self.k)


class NNGuide(HeadMixin, FeaturesDetector):
    r"""Nearest-neighbour guidance: the energy, scaled by the similarity to a confidence-weighted ID bank.

    Fit: the bank :math:`B = \{ E(z_i)\, \hat z_i \}` of the normalised ID training features
    :math:`\hat z = z / \lVert z \rVert_2`, each scaled by its confidence
    :math:`E(z) = \log \sum_c e^{l_c(z)}` (the negative energy of the head's logits :math:`l`). Score:

    .. math:: s(x) = -\underbrace{\frac1k \sum_{b \in \mathcal N_k(x)} \hat z^\top b}_{\text{guidance}}
              \cdot E(z)

    where :math:`\mathcal N_k(x)` are the :math:`k` bank entries with the largest inner product
    :math:`\hat z^\top b` (exact, in bounded memory: :func:`~.neighbour_search.top_k_mean_similarity`).

    Paper: Park, Jung & Teoh, "Nearest Neighbor Guidance for Out-of-Distribution Detection", ICCV 2023
    (arXiv:2309.14888); code github.com/roomo7time/nnguide.

    The paper, and OpenOOD (``alpha: 0.01``, ``K: 100``), build the bank from a random fraction of the ID
    training set (1% for ImageNet); this class has no such fraction: the bank is what ``fit`` is given
    (fit on a subset to follow the paper). Search space :math:`k \in \{1, 10, 50, 100, 500\}`, values above
    :math:`N` dropped.

    pytorch-ood 0.4.0: ``NNGuide(encoder, head, k=10)`` — the same positional order and names here
    (``encoder=`` for ``model``); equal scores. Differences: ``head`` must be linear (:mod:`.head`), not any
    callable; ``fit_features`` / ``predict_features`` take no ``batch_size`` (the memory is bounded by
    :data:`~.neighbour_search.CHUNK_ELEMENTS`).

    :param model: optional callable returning penultimate features (for ``fit``/``predict``)
    :param head: the classifier (:func:`~.head.parse_head`)
    :param k: number of neighbours, :math:`1 \le k \le N` (checked in ``fit``)
    """

    requires_fit: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "k": Param(Interval(int, 1, N), structural=False, doc="number of nearest bank entries averaged"),
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"k": {"grid": [1, 10, 50, 100, 500]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None, k: int = 10):
        super().__init__(model)
        self._set_head(head)
        self.k = k

    def _energy(self, z: Tensor) -> Tensor:
        return torch.logsumexp(self.logits(z), dim=1)

    def _fit(self, z: Tensor, y: Tensor) -> None:
        self._require_head()
        self.bank = normalise(z) * self._energy(z)[:, None]  #: confidence-scaled ID features, (N, D)

    def _score(self, z: Tensor) -> Tensor:
        guidance = top_k_mean_similarity(normalise(z), self.bank.to(z), self.k)
        return -guidance * self._energy(z)
