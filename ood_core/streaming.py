r"""Statistics of training rows that stream and merge: fits that never hold a second copy of the rows.

A fit that streams reads the rows in chunks (:class:`~ood_core.rows.RowSource`), in as many passes as it needs,
and keeps only a fixed-size summary; summaries of shards fitted apart (other processes, other nodes) combine
into the summary of all rows.

* :func:`mean_of_stream`: column means in float64 (the block sums of
  :func:`~ood_core.detectors.numerics.sum64`, added over the chunks).
* :class:`ClassMoments`: per-class counts :math:`n_c`, per-class sums :math:`s_c` and the scatter :math:`M` of
  the rows about a centre, in float64; :meth:`~ClassMoments.merge` combines partials accumulated about different
  centres (Chan, Golub & LeVeque's pairwise update, moved to any centre).
* :func:`shared` / :func:`moments_about_mean`: a statistic computed once for every fit of the same rows.

Exact quantiles of a stream (ReAct's threshold) are in :mod:`ood_core.quantiles`.

Precision of a chunked fit against the same fit in memory: the statistics are the same float64 sums, added in
another order where a chunk boundary falls inside a block (~1e-16 relative per addition); with chunks of a
multiple of 8192 rows (the default 65,536) the blocks, and the numbers, are those of the in-memory fit.

This module is pure torch / numpy (no ray, no mlflow), usable on its own:

>>> import torch
>>> x, y = torch.randn(1000, 8), torch.arange(1000) % 3
>>> a = ClassMoments(8).update(x[:400], y[:400])
>>> b = ClassMoments(8).update(x[400:], y[400:])  # another shard, about another centre
>>> a.merge(b).n
1000
>>> bool(torch.allclose(a.within_scatter(), ClassMoments(8).update(x, y).within_scatter(), rtol=1e-12, atol=1e-9))
True
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Tuple, TypeVar, Union

import torch
from torch import Tensor

__all__ = ["Chunks", "ClassMoments", "mean_of_stream", "moments_about_mean", "shared"]

#: rows per block of the scatter products (2048 x 512 float64 = 8 MiB): those of numerics.float64_blocks
SCATTER_ROWS = 2048

Chunk = Union[Tensor, Sequence[Tensor]]
#: a fit's stream: each call starts a new pass over ``(x, y)`` chunks of the training rows (``_fit_stream``'s
#: argument)
Chunks = Callable[[], Iterable[Tuple[Tensor, Tensor]]]
T = TypeVar("T")


def _rows(chunk: Chunk) -> Tensor:
    """The rows of a chunk: the tensor itself, or the first item of an ``(x, y)`` pair."""
    return chunk if isinstance(chunk, Tensor) else chunk[0]


def mean_of_stream(chunks: Iterable[Chunk], exact: bool = True) -> Tensor:
    """Column means ``(D,)`` float64 of the rows of ``chunks`` (tensors ``(n, D)`` or ``(x, y)`` pairs).

    Each chunk's column sums are :func:`~ood_core.detectors.numerics.sum64` (``exact``: float64 row blocks;
    otherwise float32 block sums added in float64, ~1e-7 relative, for a centre that needs no more); the sums
    are added over the chunks in float64. One chunk gives :func:`~ood_core.detectors.numerics.mean64`."""
    from .detectors.numerics import sum64  # here: ood_core.detectors imports this module

    total: Optional[Tensor] = None
    n = 0
    for chunk in chunks:
        x = _rows(chunk)
        if x.shape[0] == 0:
            continue
        part = sum64(x, exact)
        total = part if total is None else total + part
        n += int(x.shape[0])
    if total is None:
        raise ValueError("mean_of_stream: no rows")
    return total / n


def shared(chunks: Chunks, name: str, compute: Callable[[], T]) -> T:
    """``compute()``, or, when the stream offers sharing (``chunks.share``: a training set read through
    :meth:`ood_core.rows.RowSource.shared`), the value computed once under ``name`` for these rows by whichever fit
    asked first: the statistics several fits need (the class moments of Mahalanobis and RMD, the second moment of
    every ViM ``d``), so a search over a large training set passes over it once for them. ``compute`` must be a
    function of the rows alone."""
    share = getattr(chunks, "share", None)
    return compute() if share is None else share(name, compute)


def moments_about_mean(chunks: Chunks) -> "ClassMoments":
    """Two passes: the float64 mean :math:`\bar x` (:func:`mean_of_stream`), then the class counts, the sums of
    :math:`x - \bar x` and the total scatter about :math:`\bar x` (:class:`ClassMoments`); shared under
    ``"moments_about_mean"``."""
    def compute():
        center = mean_of_stream(chunks())  # pass 1; centring first limits the cancellation of "total - between"
        return ClassMoments(center.shape[0], center).update_all(chunks())  # pass 2

    return shared(chunks, "moments_about_mean", compute)


class ClassMoments:
    r"""Mergeable float64 moments of labelled rows: per class :math:`c` the count :math:`n_c` and the sum
    :math:`s_c = \sum_{i: y_i = c} (x_i - a_c)`, and the scatter about the centres,
    :math:`M = \sum_i (x_i - a_{y_i})(x_i - a_{y_i})^\top` (``scatter="total"``) or one per class,
    :math:`M_c = \sum_{i: y_i = c} (x_i - a_c)(x_i - a_c)^\top` (``scatter="class"``), or none.

    The centre :math:`a` is shared (``center`` of shape ``(D,)``; ``None``: the mean of the first rows seen) or
    one per class (``(C, D)``, with ``classes``). From these (:math:`\bar x_c = a_c + s_c / n_c`):

    .. math::
        W = \sum_i (x_i - \bar x_{y_i})(x_i - \bar x_{y_i})^\top = M - \sum_c s_c s_c^\top / n_c, \qquad
        \sum_i (x_i - p)(x_i - p)^\top = M + \sum_c \big(s_c \delta_c^\top + \delta_c s_c^\top
            + n_c \delta_c \delta_c^\top\big), \quad \delta_c = a_c - p

    (:meth:`within_scatter`, :meth:`scatter` about any :math:`p`). :meth:`merge` moves a partial to this one's
    centres by the second identity and adds it: Chan, Golub & LeVeque, "Updating Formulae and a Pairwise
    Algorithm for Computing Sample Variances", COMPSTAT 1982 (their pairwise update is the case where the
    centres are the partials' means, :math:`s = 0`). The identities are exact, so a merge of shards accumulated
    about different centres equals one pass over all rows up to float64 rounding.

    Precision. :math:`W = M - \sum_c s_c s_c^\top / n_c` cancels where the centres are far from the class
    means: its relative error is about :math:`\varepsilon_{64} \max_c \lVert \bar x_c - a_c\rVert^2 /
    \sigma_W^2` (:math:`\sigma_W^2` the within-class variance). Two passes, the mean first
    (:func:`mean_of_stream`) and the moments about it, are today's in-memory fit
    (:class:`~ood_core.detectors.Mahalanobis`): the same blocks, the same numbers (~1e-15 relative with other
    chunk boundaries), with the cancellation of the distance from the global mean to the class means. One pass
    (``center=None``: the mean of the first rows), or a merge of shards accumulated about other centres, has the
    same bound with the distance from those centres to the class means instead: larger where the first rows are
    all of one class (files sorted by class); with classes ~300 within-class deviations apart the tests measure
    5e-11 relative for both (two passes: 4e-11). Per-class centres from a first pass (the class means, as
    :class:`~ood_core.detectors.GMM` uses them) leave no cancellation: 1e-15.

    ``dtype``: the products' precision. float64 (default): float64 row blocks of :math:`x - a`, products and
    sums in float64. ``None``: in the chunks' dtype (float32 at least), about a shared centre: float32 products
    of :data:`SCATTER_ROWS`-row blocks summed in float64 (~1e-7 relative), as
    :func:`~ood_core.detectors.numerics.scatter` (ViM's second moment); the centre is then rounded to float32
    (``None``: the float32 mean of the first rows), which is what makes a float32 :math:`x - a` small.

    :param dim: the width ``D`` of the rows
    :param center: shared ``(D,)``, per class ``(C, D)`` (with ``classes``), or ``None``
    :param classes: the labels, sorted ``(C,)``: only these are accepted, each keeps its row even without
        samples (its mean is then its centre); ``None``: the labels seen, in sorted order
    :param scatter: ``"total"``, ``"class"`` or ``None``
    :param dtype: products in float64 (default) or in the chunks' dtype (``None``)
    :param device: where the statistics live (default: the first chunk's device)
    """

    def __init__(self, dim: int, center: Optional[Tensor] = None, classes: Optional[Tensor] = None,
                 scatter: Optional[str] = "total", dtype: Optional[torch.dtype] = torch.float64, device=None):
        if scatter not in ("total", "class", None):
            raise ValueError(f"ClassMoments: scatter must be 'total', 'class' or None, got {scatter!r}")
        if dtype not in (torch.float64, None):
            raise ValueError(f"ClassMoments: dtype must be torch.float64 or None, got {dtype}")
        self.dim = int(dim)
        self.scatter_kind = scatter
        self.dtype = dtype
        self.per_class = center is not None and center.ndim == 2
        if self.per_class and classes is None:
            raise ValueError("ClassMoments: per-class centres need their classes")
        if dtype is None and (self.per_class or scatter == "class"):
            raise ValueError("ClassMoments: products in the chunks' dtype need a shared centre and the total scatter")
        if center is not None and center.shape[-1] != self.dim:
            raise ValueError(f"ClassMoments: centre of width {center.shape[-1]}, rows of width {self.dim}")
        self.device = None if device is None else torch.device(device)
        self.fixed = classes is not None
        #: the labels, sorted (C,) int64
        self.classes = torch.empty(0, dtype=torch.long) if classes is None else torch.as_tensor(classes).long()
        if self.fixed and self.classes.numel() > 1 and not bool((self.classes[1:] > self.classes[:-1]).all()):
            raise ValueError("ClassMoments: classes must be sorted and distinct")
        if self.per_class and center.shape[0] != self.classes.numel():
            raise ValueError(f"ClassMoments: {center.shape[0]} centres for {self.classes.numel()} classes")
        self.center: Optional[Tensor] = None if center is None else self._as_center(center.detach())
        self.product_dtype: Optional[torch.dtype] = None if dtype is None else torch.float64
        self._counts = torch.zeros(self.classes.numel(), dtype=torch.long)
        self.sums = torch.zeros(self.classes.numel(), self.dim, dtype=torch.float64)  #: s_c, (C, D)
        self.total: Optional[Tensor] = None  #: M, (D, D) (``scatter="total"``)
        self.class_total: Optional[Tensor] = None  #: M_c, (C, D, D) (``scatter="class"``)
        if scatter == "total":
            self.total = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        elif scatter == "class":
            self.class_total = torch.zeros(self.classes.numel(), self.dim, self.dim, dtype=torch.float64)
        if self.device is not None:
            self._move(self.device)

    # -- state ------------------------------------------------------------------------------
    def _as_center(self, center: Tensor) -> Tensor:
        c = center.to(torch.float64, copy=True)
        return c.float().double() if self.dtype is None else c  # float32 products: a float32 centre

    def _move(self, device) -> None:
        self.device = torch.device(device)
        for name in ("classes", "_counts", "sums", "total", "class_total", "center"):
            value = getattr(self, name)
            if isinstance(value, Tensor):
                setattr(self, name, value.to(self.device))

    @property
    def n(self) -> int:
        """The number of rows."""
        return int(self._counts.sum())

    @property
    def counts(self) -> Tensor:
        """:math:`n_c`, ``(C,)`` float64."""
        return self._counts.to(torch.float64)

    def _grow(self, labels: Tensor) -> None:
        """Rows for labels not seen before (zero counts, sums and scatters), in sorted order."""
        new = torch.unique(labels)
        if self.classes.numel():
            new = new[~torch.isin(new, self.classes)]
        if not new.numel():
            return
        classes = torch.cat([self.classes, new]).sort().values
        at = torch.searchsorted(classes, self.classes)

        def regrow(old: Tensor) -> Tensor:
            out = old.new_zeros((classes.numel(), *old.shape[1:]))
            out[at] = old
            return out

        self._counts, self.sums = regrow(self._counts), regrow(self.sums)
        if self.class_total is not None:
            self.class_total = regrow(self.class_total)
        self.classes = classes

    def _index(self, labels: Tensor) -> Tensor:
        """The row of each label in :attr:`classes`."""
        if not self.fixed:
            self._grow(labels)
        idx = torch.searchsorted(self.classes, labels.contiguous()).clamp(max=max(self.classes.numel() - 1, 0))
        if not self.classes.numel() or not bool((self.classes[idx] == labels).all()):
            bad = labels[(self.classes[idx] != labels)] if self.classes.numel() else labels
            raise ValueError(f"ClassMoments: label {int(bad[0])} is not one of the {self.classes.numel()} classes")
        return idx

    # -- accumulation -------------------------------------------------------------------------
    def update(self, x: Tensor, y: Optional[Tensor] = None) -> "ClassMoments":
        """Add rows ``x`` ``(n, D)`` with labels ``y`` ``(n,)`` (``None``: all of one class, label 0)."""
        from .detectors.numerics import float64_blocks  # here: ood_core.detectors imports this module

        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"ClassMoments: rows must have shape (n, {self.dim}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return self
        if self.device is None:
            self._move(x.device)
        x = x.to(self.device)
        one_class = y is None
        labels = torch.zeros(x.shape[0], dtype=torch.long, device=self.device) if one_class else \
            torch.as_tensor(y, device=self.device).long()
        if labels.shape != (x.shape[0],):
            raise ValueError(f"ClassMoments: labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
        idx = self._index(labels)
        if self.center is None:  # one pass: about the first rows' mean
            head = x[:SCATTER_ROWS]
            self.center = self._as_center(head.to(self._products(x)).mean(dim=0) if self.dtype is None
                                          else head.to(torch.float64).mean(dim=0))
        self._counts += torch.bincount(idx, minlength=self.classes.numel())
        if self.scatter_kind == "class":
            self._update_class_scatter(x, idx)
        if self.dtype is None:
            self._update_products(x, idx, one_class)
            return self
        if self.per_class:
            for s in range(0, x.shape[0], SCATTER_ROWS):
                rows = idx[s : s + SCATTER_ROWS]
                blk = x[s : s + SCATTER_ROWS].to(torch.float64) - self.center.index_select(0, rows)
                self._add_block(blk, rows, one_class)
            return self
        for start, blk in float64_blocks(x, self.center, SCATTER_ROWS):  # float64 row blocks of x - a
            self._add_block(blk, idx[start : start + blk.shape[0]], one_class)
        return self

    def _add_block(self, blk: Tensor, rows: Tensor, one_class: bool) -> None:
        if one_class:  # every row in the class of label 0
            self.sums[rows[0]] += blk.sum(dim=0)
        else:
            self.sums.index_add_(0, rows, blk)
        if self.total is not None:
            self.total.addmm_(blk.T, blk)

    def _products(self, x: Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def _update_products(self, x: Tensor, idx: Tensor, one_class: bool) -> None:
        """Products in the rows' dtype (float32 at least) about the float32 centre, summed in float64."""
        dtype = self._products(x)
        if self.product_dtype is None:
            self.product_dtype = dtype
        elif self.product_dtype != dtype:
            raise ValueError(f"ClassMoments: chunks of {dtype} after chunks of {self.product_dtype}")
        center = self.center.to(dtype)
        for s in range(0, x.shape[0], SCATTER_ROWS):
            xc = x[s : s + SCATTER_ROWS].to(dtype) - center
            if one_class:
                self.sums[idx[0]] += xc.sum(dim=0, dtype=torch.float64)
            else:
                self.sums.index_add_(0, idx[s : s + SCATTER_ROWS], xc.to(torch.float64))
            if self.total is not None:
                self.total += (xc.T @ xc).to(torch.float64)

    def _update_class_scatter(self, x: Tensor, idx: Tensor) -> None:
        """:math:`M_c` of each class, over float64 row blocks of that class's rows about its centre."""
        from .detectors.numerics import float64_blocks

        order = torch.argsort(idx, stable=True)
        per_class = torch.bincount(idx, minlength=self.classes.numel()).tolist()
        grouped = x[order]
        start = 0
        for k, count in enumerate(per_class):
            if count:
                center = self.center[k] if self.per_class else self.center
                for _, blk in float64_blocks(grouped[start : start + count], center, SCATTER_ROWS):
                    self.class_total[k].addmm_(blk.T, blk)
            start += count

    def update_all(self, chunks: Iterable[Chunk]) -> "ClassMoments":
        """:meth:`update` with each chunk: ``(x, y)`` pairs or tensors ``x`` (one class)."""
        for chunk in chunks:
            if isinstance(chunk, Tensor):
                self.update(chunk)
            else:
                self.update(chunk[0], chunk[1])
        return self

    # -- merging --------------------------------------------------------------------------------
    def _moved(self, other: "ClassMoments", at: Tensor):
        r"""``other``'s sums and scatters about this partial's centres: :math:`s_c + n_c \delta_c` and
        :math:`M + \sum_c (s_c \delta_c^\top + \delta_c s_c^\top + n_c \delta_c\delta_c^\top)`,
        :math:`\delta_c = a_c^{other} - a_c`."""
        n_c = other.counts
        if self.per_class:
            delta = other.center - self.center[at]  # (C_o, D)
            sums = other.sums + n_c[:, None] * delta
            total = None
            if other.total is not None:
                cross = other.sums.T @ delta
                total = other.total + cross + cross.T + (delta * n_c[:, None]).T @ delta
        else:
            delta = other.center - self.center  # (D,)
            sums = other.sums + n_c[:, None] * delta
            total = None
            if other.total is not None:
                cross = torch.outer(other.sums.sum(dim=0), delta)
                total = other.total + cross + cross.T + float(n_c.sum()) * torch.outer(delta, delta)
            delta = delta.expand(n_c.shape[0], -1)
        class_total = None
        if other.class_total is not None:
            cross = other.sums[:, :, None] * delta[:, None, :]  # s_c delta_c^T, (C_o, D, D)
            class_total = (other.class_total + cross + cross.transpose(1, 2)
                           + n_c[:, None, None] * delta[:, :, None] * delta[:, None, :])
        return sums, total, class_total

    def merge(self, other: "ClassMoments") -> "ClassMoments":
        """Add the rows summarised by ``other`` (accumulated about any centres) to this partial, in place:
        ``other`` moved to this partial's centres (the identities of the class docstring) and added."""
        if (other.dim, other.scatter_kind, other.per_class, other.dtype) != \
                (self.dim, self.scatter_kind, self.per_class, self.dtype):
            raise ValueError("ClassMoments.merge: partials of different width, scatter, centres or precision")
        if other.dtype is None and self.product_dtype and other.product_dtype and \
                self.product_dtype != other.product_dtype:
            raise ValueError("ClassMoments.merge: partials with products of different precision")
        if other.n == 0:
            return self
        if self.device is None:
            self._move(other.device)
        if self.dtype is None and self.product_dtype is None:
            self.product_dtype = other.product_dtype
        other_classes = other.classes.to(self.device)
        if self.fixed:
            self._index(other_classes)  # refuses labels outside the fixed classes
        else:
            self._grow(other_classes)
        at = torch.searchsorted(self.classes, other_classes)
        if self.center is None:
            self.center = other.center.to(self.device).clone()
        if self.per_class:  # classes without rows here take the other's centres (nothing to move)
            empty = self._counts[at] == 0
            self.center[at[empty]] = other.center.to(self.device)[empty]
        moved_other = _on(other, self.device)
        sums, total, class_total = self._moved(moved_other, at)
        self._counts.index_add_(0, at, moved_other._counts)
        self.sums.index_add_(0, at, sums)
        if total is not None:
            self.total += total
        if class_total is not None:
            self.class_total.index_add_(0, at, class_total)
        return self

    # -- results ----------------------------------------------------------------------------------
    def _present(self) -> Tensor:
        if self.n == 0:
            raise ValueError("ClassMoments: no rows")
        return self.counts.clamp(min=1.0)[:, None]

    def offsets(self) -> Tensor:
        r""":math:`\bar x_c - a_c = s_c / n_c`, ``(C, D)`` (0 for a class without rows)."""
        return self.sums / self._present()

    def means(self) -> Tensor:
        r"""The class means :math:`\bar x_c`, ``(C, D)`` float64 (a class without rows: its centre)."""
        return self.center + self.offsets()

    def mean(self) -> Tensor:
        """The mean of all rows, ``(D,)`` float64."""
        self._present()
        n = self.n
        if self.per_class:
            return (self.counts @ self.center + self.sums.sum(dim=0)) / n
        return self.center + self.sums.sum(dim=0) / n

    def _scatter_about_centres(self) -> Tensor:
        if self.total is not None:
            return self.total
        if self.class_total is not None:
            return self.class_total.sum(dim=0)
        raise ValueError("ClassMoments: built with scatter=None")

    def within_scatter(self) -> Tensor:
        r""":math:`W = \sum_i (x_i - \bar x_{y_i})(x_i - \bar x_{y_i})^\top = M - \sum_c s_c s_c^\top / n_c`,
        ``(D, D)`` float64 (symmetric up to rounding)."""
        m = self.offsets()
        return self._scatter_about_centres() - (m * self.counts[:, None]).T @ m

    def within_covariance(self) -> Tensor:
        """:meth:`within_scatter` over the number of rows: the pooled within-class covariance."""
        return self.within_scatter() / self.n

    def scatter(self, about: Optional[Tensor] = None) -> Tensor:
        r""":math:`\sum_i (x_i - p)(x_i - p)^\top` about ``about`` = :math:`p` ``(D,)`` (``None``: about the
        shared centre :math:`a`, nothing moved), ``(D, D)`` float64, symmetrised."""
        m = self._scatter_about_centres()
        if about is None:
            if self.per_class:
                raise ValueError("ClassMoments.scatter: per-class centres: say about which point")
            return 0.5 * (m + m.T)
        p = about.to(device=m.device, dtype=torch.float64)
        if self.per_class:
            delta = self.center - p  # (C, D)
            cross = self.sums.T @ delta
            out = m + cross + cross.T + (delta * self.counts[:, None]).T @ delta
        else:  # as numerics.scatter: S_p = S_a + s delta^T + delta s^T + n delta delta^T, delta = a - p
            delta = self.center - p
            cross = torch.outer(self.sums.sum(dim=0), delta)
            out = m.clone().add_(cross + cross.T).add_(torch.outer(delta, delta), alpha=self.n)
        return 0.5 * (out + out.T)

    def covariance(self, about: Optional[Tensor] = None) -> Tensor:
        """:meth:`scatter` over the number of rows (``about=None`` with a shared centre from :func:`mean_of_stream`:
        the covariance)."""
        return self.scatter(about) / self.n

    def class_scatters(self) -> Tensor:
        r""":math:`M_c - s_c s_c^\top / n_c`: each class's scatter about its mean, ``(C, D, D)`` float64,
        symmetrised (``scatter="class"``)."""
        if self.class_total is None:
            raise ValueError("ClassMoments: per-class scatters need scatter='class'")
        m = self.offsets()
        out = self.class_total - self.counts[:, None, None] * m[:, :, None] * m[:, None, :]
        return 0.5 * (out + out.transpose(1, 2))


def _on(moments: ClassMoments, device) -> ClassMoments:
    """``moments`` with its tensors on ``device`` (a shallow copy where they move)."""
    if moments.device == device:
        return moments
    copy = object.__new__(ClassMoments)
    copy.__dict__.update(moments.__dict__)
    copy._move(device)
    return copy
