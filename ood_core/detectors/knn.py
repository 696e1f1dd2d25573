"""Nearest-neighbour detectors on penultimate features: KNN and NNGuide.

Both search a memory bank of ID training features: a seeded random fraction ``alpha`` of the ID training rows
(all of them by default), built while the training rows stream by in chunks (``streams_fit``: only the bank is
held). The search is exact by default and approximate (a faiss IVF index, ``index="ivf"``) as an option whose
recall is measured (``recall_``). The engine lives in :mod:`.neighbour_search`.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar, Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ..api import FeaturesDetector
from ..constraints import Boolean, Interval, N, Options, Param, ParameterError
from .head import Head, HeadMixin
from .neighbour_search import (INSTALL_FAISS, IVFIndex, bank_size, draw_bank_rows, gather_rows, import_faiss,
                               ivf_kth_nearest_distance, ivf_top_k_mean_similarity, kth_nearest_distance,
                               recall_at_k, top_k_mean_similarity)

#: bank rows used as held-out queries to measure an IVF index's recall (:attr:`_MemoryBank.recall_`)
RECALL_QUERIES = 1000


def normalise(z: Tensor) -> Tensor:
    """Rows of ``z`` scaled to unit L2 norm (zero rows stay zero)."""
    return z / z.norm(dim=1, keepdim=True).clamp(min=1e-12)


#: the memory-bank hyperparameters KNN and NNGuide share
BANK_PARAMETERS: Dict[str, Param] = {
    "alpha": Param(Interval(float, 0, 1, closed="right"),
                   doc="bank fraction: the bank is a seeded random ceil(alpha*N) of the N ID training rows"),
    "seed": Param(Interval(int, 0, None), doc="seed of the bank's rows (and of the IVF index's k-means)"),
    "index": Param(Options("exact", "ivf"), doc="'exact' search, or an approximate faiss IVF index"),
    "nlist": Param(Interval(int, 1, N), None, doc="IVF cells, <= the bank size; None: round(sqrt(bank size))"),
    "nprobe": Param(Interval(int, 1, None), structural=False,
                    doc="IVF cells searched per query (clamped to nlist; nlist: exhaustive)"),
}


class _MemoryBank:
    r"""The memory bank KNN and NNGuide share: which rows, how they are gathered, how they are searched.

    * Rows: ``alpha`` (structural), the bank fraction: :math:`m = \lceil \alpha N \rceil` of the :math:`N` ID
      training rows, uniformly at random without replacement, drawn up front from :math:`N` with ``seed``
      (:func:`~.neighbour_search.draw_bank_rows`), so the same ``alpha`` and ``seed`` give the same bank;
      ``alpha = 1``: every row, in order (no draw). The rows are gathered from the training stream in one pass
      (:func:`~.neighbour_search.gather_rows`), each stored as its bank entry; ``fit_features`` on a tensor is
      the same pass over one chunk. ``k`` (and ``nlist``) must not exceed :math:`m`: the bound is checked with
      the data (:meth:`check_params`, so the sweep's plan refuses it before compute).
    * Search: ``index="exact"`` (default): the exact chunked search; ``"ivf"``: a faiss ``IndexIVFFlat``
      (:class:`~.neighbour_search.IVFIndex`, on the CPU, float32) with ``nlist`` cells (structural; ``None``:
      :func:`~.neighbour_search.default_nlist`) of which ``nprobe`` (not structural) are searched per query.
    * ``recall_``: recall@k of the search at the current ``k`` and ``nprobe``
      (:func:`~.neighbour_search.recall_at_k`), measured on a held-out sample of the bank: ``RECALL_QUERIES``
      bank rows (drawn with ``seed``) used as queries, each one's own entry left out of both searches. It is
      computed when first read after a fit or a change of ``k`` / ``nprobe`` (cost: an exact search of those
      queries, in the bank's dtype, on its device) and is 1.0 for the exact search. The queries are ID rows:
      OOD queries, far from every cell, may see a much lower recall (synthetic 128,000-row bank, ``nprobe=4``:
      1.0 on ID rows, 0.41 on OOD queries); :meth:`recall_on` measures it on given features (e.g. the OOD
      validation set).
    """

    metric: ClassVar[str] = "l2"

    @classmethod
    def check_params(cls, params: Mapping[str, Any], data: Optional[Mapping[str, int]] = None) -> None:
        """The declared constraints; ``index="ivf"`` needs faiss installed; and with ``N``: ``k`` and ``nlist`` at
        most the bank size :math:`\\lceil \\alpha N \\rceil`. The bound is checked when ``k`` (``nlist``) is among
        ``params`` (``alpha`` absent: its default, 1). The sweep's plan checks each searched value together with
        the fixed ones: ``k`` searched with ``alpha`` fixed (or ``alpha`` searched with ``k`` fixed) is checked
        value by value before compute; when ``k`` is not among them (searched along with ``alpha``, or left at
        its default), a combination past the bound is refused by the trial's ``fit`` (the same message)."""
        super().check_params(params, data)  # type: ignore[misc]
        if isinstance(params.get("index"), str) and params["index"].lower() == "ivf":
            try:  # a missing optional dependency is said where the value is checked: construction, the plan
                import_faiss()
            except ImportError:
                raise ParameterError(cls.__name__, "index", f"{params['index']!r} needs faiss, which is not "
                                                            f"installed: {INSTALL_FAISS}") from None
        n = (data or {}).get("N")
        if not n:
            return
        alpha = params.get("alpha", cls._default("alpha"))
        m = bank_size(int(n), alpha)
        for name in ("k", "nlist"):
            value = params.get(name)
            if value is not None and value > m:
                raise ParameterError(cls.__name__, name, f"{value!r} must be <= the bank size ceil(alpha*N) = "
                                                         f"ceil({alpha:g}*{n}) = {m}; lower {name} or raise alpha")

    @classmethod
    def _default(cls, name: str) -> Any:
        return inspect.signature(cls.__init__).parameters[name].default

    def _set_bank_params(self, alpha: float, seed: int, index: str, nlist: Optional[int], nprobe: int) -> None:
        self.alpha, self.seed, self.index, self.nlist, self.nprobe = alpha, seed, index, nlist, nprobe

    # -- what a bank entry and a query are (per detector) ------------------------------------------------------
    def _entry(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _query(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- fit -------------------------------------------------------------------------------------------------
    def _fit(self, z: Tensor, y: Tensor) -> None:
        self._fit_stream(lambda: iter([(z, y)]))

    def _fit_stream(self, chunks: Callable[[], Iterable[Tuple[Tensor, Tensor]]]) -> None:
        n = int(self._data_sizes["N"])
        rows = draw_bank_rows(n, self.alpha, self.seed)
        self.bank_rows_ = rows  #: indices of the bank's rows among the ID training rows, sorted, (m,)
        selections = {"bank": (rows, self._entry)}
        ivf = str(self.index).lower() == "ivf"
        if ivf:
            m = rows.numel()
            held = torch.randperm(m, generator=torch.Generator().manual_seed(int(self.seed)))[:RECALL_QUERIES]
            held = held.sort().values
            selections["recall"] = (rows[held], self._query)
        got = gather_rows(chunks(), selections)
        self.bank = got["bank"]  #: the bank entries, (m, D)
        self.ivf_ = IVFIndex(self.bank, self.metric, self.nlist, self.seed) if ivf else None  #: the IVF index
        self._recall_queries = got.get("recall")
        self._recall_exclude = held if ivf else None
        self._recall_cache: Dict[Tuple[int, int], float] = {}

    @property
    def bank_size_(self) -> int:
        """Rows in the bank, :math:`\\lceil \\alpha N \\rceil`."""
        return int(self.bank.shape[0])

    @property
    def recall_(self) -> float:
        """Recall@k of the search at the current ``k`` / ``nprobe`` on the held-out bank sample (class doc)."""
        self._require_fit()
        if self.ivf_ is None:
            return 1.0
        key = (int(self.k), int(self.nprobe))
        if key not in self._recall_cache:
            self._recall_cache[key] = recall_at_k(self.ivf_, self.bank, self._recall_queries, self.k,
                                                  self.nprobe, exclude=self._recall_exclude)
        return self._recall_cache[key]

    def recall_on(self, features: Tensor, max_queries: int = RECALL_QUERIES) -> float:
        """Recall@k of the search at the current ``k`` / ``nprobe`` on other queries: up to ``max_queries``
        evenly spaced rows of ``features`` (e.g. the OOD validation set: queries far from the bank may see a
        lower recall than :attr:`recall_`'s ID rows); 1.0 for the exact search."""
        self._require_fit()
        z = self._input(features, name="features")
        if self.ivf_ is None:
            return 1.0
        step = max(1, -(-z.shape[0] // max_queries))
        return recall_at_k(self.ivf_, self.bank, self._query(z[::step]), self.k, self.nprobe)


class KNN(_MemoryBank, FeaturesDetector):
    r"""Deep nearest neighbours: distance to the :math:`k`-th nearest ID training feature in the bank.

    .. math::
        s(x) = \lVert \hat z - \hat z_{(k)} \rVert_2, \qquad \hat z = z / \lVert z \rVert_2

    where :math:`\hat z_{(k)}` is the :math:`k`-th nearest of the normalised bank features
    (``normalize=False``: the raw features, :math:`\hat z = z`). The bank is a seeded random fraction ``alpha``
    of the ID training rows (default 1: all of them), gathered from a stream of row chunks. The search is
    exact, in bounded memory, on the device of the input (:func:`~.neighbour_search.kth_nearest_distance`), or,
    with ``index="ivf"``, approximate through a faiss IVF index on the CPU
    (:func:`~.neighbour_search.ivf_kth_nearest_distance`: the neighbour it finds, its distance recomputed
    directly), whose recall is measured in :attr:`recall_`. Details: :class:`_MemoryBank`.

    Paper: Sun, Ming, Zhu & Li, "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022
    (arXiv:2204.06507); code github.com/deeplearning-wisc/knn-ood. The paper samples
    :math:`\alpha \in \{1\%, 10\%, 50\%, 100\%\}` of ImageNet (``np.random.choice(N, int(N * alpha),
    replace=False)``; :math:`k = 1000` at 100%, :math:`k = 10` at 1%); here :math:`\lceil \alpha N\rceil` rows.

    Search space: OpenOOD's grid :math:`k \in \{50, 100, 200, 500, 1000\}` (it searches no ``alpha``: the
    whole bank) without the values above :math:`N`; when none fits (:math:`N < 50`),
    :math:`k \in \{1, 5, 10, 20\}` up to :math:`N` (the constructor's default ``k=50`` needs :math:`N \ge 50`:
    ``fit`` refuses it otherwise, naming the bound). ``alpha`` is searchable (``search: {alpha: {grid: [0.01,
    0.1, 1.0]}}``); with ``alpha < 1`` the grid's ``k`` must fit :math:`\lceil \alpha N\rceil`.

    pytorch-ood 0.4.0: ``KNN(encoder, k=50, normalize=True, **knn_kwargs)`` — the same positional order and
    names here (``encoder=`` for ``model``). Differences: pytorch-ood searches with scikit-learn's
    ``NearestNeighbors`` on the CPU and passes ``knn_kwargs`` to it; here the search is our exact torch engine
    on the input's device, and ``knn_kwargs`` are not accepted.

    :param model: optional callable returning penultimate features (for ``fit``/``predict``)
    :param k: neighbour rank, :math:`1 \le k \le \lceil \alpha N \rceil` (checked in ``fit``)
    :param normalize: L2-normalise the features first (the paper's choice)
    :param alpha: bank fraction, :math:`0 < \alpha \le 1`
    :param seed: seed of the bank's rows and of the IVF k-means
    :param index: ``"exact"`` or ``"ivf"`` (needs faiss: ``pip install 'ood-sweep[faiss]'``)
    :param nlist: IVF cells (``None``: :math:`\mathrm{round}(\sqrt{m})`, at most :math:`m / 39`)
    :param nprobe: IVF cells searched per query
    """

    requires_fit: ClassVar[bool] = True
    streams_fit: ClassVar[bool] = True
    metric: ClassVar[str] = "l2"
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "k": Param(Interval(int, 1, N), structural=False, doc="neighbour rank (distance to the k-th nearest)"),
        "normalize": Param(Boolean(), doc="L2-normalise the features (the bank is stored normalised)"),
        **BANK_PARAMETERS,
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"k": {"grid": [50, 100, 200, 500, 1000]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, k: int = 50, normalize: bool = True,
                 alpha: float = 1.0, seed: int = 0, index: str = "exact", nlist: Optional[int] = None,
                 nprobe: int = 8):
        super().__init__(model)
        self.k = k
        self.normalize = normalize
        self._set_bank_params(alpha, seed, index, nlist, nprobe)

    @classmethod
    def search_space(cls, data: Optional[Mapping[str, int]] = None) -> Dict[str, Any]:
        space = super().search_space(data)
        if data and data.get("N") and "k" not in space:  # N < 50: no value of OpenOOD's grid fits
            space["k"] = {"grid": [k for k in (1, 5, 10, 20) if k <= data["N"]]}
        return space

    def _entry(self, z: Tensor) -> Tensor:
        return normalise(z) if self.normalize else z

    _query = _entry

    def _score(self, z: Tensor) -> Tensor:
        q = self._query(z)
        bank = self.bank.to(q)
        if self.ivf_ is not None:
            return ivf_kth_nearest_distance(self.ivf_, q, bank, self.k, self.nprobe)
        return kth_nearest_distance(q, bank, self.k)


class NNGuide(_MemoryBank, HeadMixin, FeaturesDetector):
    r"""Nearest-neighbour guidance: the energy, scaled by the similarity to a confidence-weighted ID bank.

    Fit: the bank :math:`B = \{ E(z_i)\, \hat z_i \}` of the normalised ID training features
    :math:`\hat z = z / \lVert z \rVert_2` of a seeded random fraction ``alpha`` of the ID training rows (default
    1: all of them), each scaled by its confidence :math:`E(z) = \log \sum_c e^{l_c(z)}` (the negative energy of
    the head's logits :math:`l`), gathered from a stream of row chunks. Score:

    .. math:: s(x) = -\underbrace{\frac1k \sum_{b \in \mathcal N_k(x)} \hat z^\top b}_{\text{guidance}}
              \cdot E(z)

    where :math:`\mathcal N_k(x)` are the :math:`k` bank entries with the largest inner product
    :math:`\hat z^\top b` (exact, in bounded memory: :func:`~.neighbour_search.top_k_mean_similarity`; with
    ``index="ivf"``, those a faiss IVF index finds: :func:`~.neighbour_search.ivf_top_k_mean_similarity`,
    recall in :attr:`recall_`). Details: :class:`_MemoryBank`.

    Paper: Park, Jung & Teoh, "Nearest Neighbor Guidance for Out-of-Distribution Detection", ICCV 2023
    (arXiv:2309.14888); code github.com/roomo7time/nnguide.

    The paper's code and OpenOOD (``alpha: 0.01``, ``K: 100``; it searches ``K`` only, over ``[100]``) build the
    bank from a random 1% of the ID training set (the paper: ImageNet-1K only; its code shuffles with
    ``np.random`` and keeps ``int(N * alpha)`` rows; OpenOOD keeps the first batches of its shuffled train
    loader past ``alpha * N``). Here ``alpha`` defaults to 1 (the whole training set: the scores of earlier
    versions, which had no fraction, and a sensible bank for CIFAR-size sets, where 1% is 500 rows); set
    ``alpha=0.01`` to follow the paper on ImageNet (:math:`\lceil \alpha N\rceil` rows, seeded). Search space
    :math:`k \in \{1, 10, 50, 100, 500\}`, values above :math:`N` dropped; ``alpha`` is searchable.

    pytorch-ood 0.4.0: ``NNGuide(encoder, head, k=10)`` — the same positional order and names here
    (``encoder=`` for ``model``); equal scores. Differences: ``head`` must be linear (:mod:`.head`), not any
    callable; ``fit_features`` / ``predict_features`` take no ``batch_size`` (the memory is bounded by
    :data:`~.neighbour_search.CHUNK_ELEMENTS`).

    :param model: optional callable returning penultimate features (for ``fit``/``predict``)
    :param head: the classifier (:func:`~.head.parse_head`)
    :param k: number of neighbours, :math:`1 \le k \le \lceil \alpha N \rceil` (checked in ``fit``)
    :param alpha: bank fraction, :math:`0 < \alpha \le 1`
    :param seed: seed of the bank's rows and of the IVF k-means
    :param index: ``"exact"`` or ``"ivf"`` (needs faiss: ``pip install 'ood-sweep[faiss]'``)
    :param nlist: IVF cells (``None``: :math:`\mathrm{round}(\sqrt{m})`, at most :math:`m / 39`)
    :param nprobe: IVF cells searched per query
    """

    requires_fit: ClassVar[bool] = True
    streams_fit: ClassVar[bool] = True
    metric: ClassVar[str] = "ip"
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "k": Param(Interval(int, 1, N), structural=False, doc="number of nearest bank entries averaged"),
        **BANK_PARAMETERS,
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"k": {"grid": [1, 10, 50, 100, 500]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None, k: int = 10,
                 alpha: float = 1.0, seed: int = 0, index: str = "exact", nlist: Optional[int] = None,
                 nprobe: int = 8):
        super().__init__(model)
        self._set_head(head)
        self.k = k
        self._set_bank_params(alpha, seed, index, nlist, nprobe)

    def _energy(self, z: Tensor) -> Tensor:
        return torch.logsumexp(self.logits(z), dim=1)

    def _entry(self, z: Tensor) -> Tensor:
        return normalise(z) * self._energy(z)[:, None]

    def _query(self, z: Tensor) -> Tensor:
        return normalise(z)

    def _fit_stream(self, chunks: Callable[[], Iterable[Tuple[Tensor, Tensor]]]) -> None:
        self._require_head()
        super()._fit_stream(chunks)

    def _score(self, z: Tensor) -> Tensor:
        q = self._query(z)
        bank = self.bank.to(q)
        if self.ivf_ is not None:
            guidance = ivf_top_k_mean_similarity(self.ivf_, q, bank, self.k, self.nprobe)
        else:
            guidance = top_k_mean_similarity(q, bank, self.k)
        return -guidance * self._energy(z)
