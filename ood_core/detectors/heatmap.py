"""Heatmap-based OOD detection: a decoder trained on classifier features whose heatmap size is the score
(model in the loop: it trains on inputs and auxiliary outliers)."""
from __future__ import annotations

import math
from typing import Callable, ClassVar, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import Detector, DetectorError, InvalidInputError, check_input
from ..constraints import Interval, Param
from .model_in_loop import ModelInputs

#: upper bound on the elements of one (outlier chunk x ID train) distance block for the prototypes
CHUNK_ELEMENTS = 1 << 22


class HeatmapDecoder(nn.Module):
    """Transposed-convolution decoder ``[z, onehot(c)] -> heatmap (N, channels, H, W)`` in ``(-1, 1)``.

    ``Linear(D + C, latent_dim)``, viewed as a ``1 x 1`` map; ``ConvT 4x4`` to ``4 x 4``; stride-2
    ``ConvT 4x4`` blocks, each doubling the size and halving the width, until the map covers the image;
    ``ConvT 1x1`` to the image channels and ``tanh`` (every block but the last: batch norm and ReLU).
    For 32 x 32 images, ``width = 512``, ``latent_dim = 100`` this is the paper's CIFAR-10 ResNet18
    decoder. Sizes that are not ``4 * 2^k`` are reached by bilinear resizing of the last map.
    """

    def __init__(self, in_features: int, num_classes: int, image_shape: Tuple[int, int, int],
                 width: int = 512, latent_dim: int = 100):
        super().__init__()
        channels, height, width_px = image_shape
        self.num_classes, self.image_shape = int(num_classes), (int(channels), int(height), int(width_px))
        self.fc = nn.Linear(in_features + num_classes, latent_dim)
        steps = max(0, math.ceil(math.log2(max(height, width_px) / 4)))
        widths = [max(width >> i, 8) for i in range(steps + 1)]
        layers: List[nn.Module] = [nn.ConvTranspose2d(latent_dim, widths[0], 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU()]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 1, 1, 0, bias=False), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor, pred: Tensor) -> Tensor:
        x = torch.cat([z, F.one_hot(pred, self.num_classes).to(z.dtype)], dim=1)
        out = self.body(self.fc(x)[:, :, None, None])
        size = self.image_shape[1:]
        if tuple(out.shape[-2:]) != size:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out


def weighted_reconstruction_loss(x_hat: Tensor, target: Tensor) -> Tensor:
    r"""Per-sample :math:`\sum_{\text{pixels, channels}} (1 + 5|t|)\,(\hat x - t)^2` (the paper's loss), ``(N,)``."""
    return ((1 + 5 * target.abs()) * (x_hat - target) ** 2).flatten(1).sum(dim=1)


def heatmap_score(heatmap: Tensor) -> Tensor:
    """Mean over pixels of the max over channels of ``|heatmap|`` ``(N, C, H, W)`` -> ``(N,)``."""
    return heatmap.abs().amax(dim=1).flatten(1).mean(dim=1)


def nearest_same_class(z_query: Tensor, c_query: Tensor, z_bank: Tensor, c_bank: Tensor) -> Tensor:
    """Index into the bank of the nearest (Euclidean) row with the same class, for every query row;
    queries of a class the bank lacks take the nearest row of any class. Chunked: bounded memory."""
    has = torch.zeros(int(max(c_query.max(), c_bank.max())) + 1, dtype=torch.bool, device=z_bank.device)
    has[c_bank] = True
    bank_sq = (z_bank * z_bank).sum(dim=1)
    rows = max(1, CHUNK_ELEMENTS // max(z_bank.shape[0], 1))
    out = torch.empty(z_query.shape[0], dtype=torch.long, device=z_query.device)
    for s in range(0, z_query.shape[0], rows):
        q, c = z_query[s : s + rows], c_query[s : s + rows]
        d2 = torch.addmm(bank_sq, q, z_bank.T, alpha=-2.0)  # |t|^2 - 2 q.t: the order of |q - t|^2
        other = (c[:, None] != c_bank[None, :]) & has[c][:, None]
        out[s : s + rows] = d2.masked_fill_(other, float("inf")).argmin(dim=1)
    return out


class HeatmapOOD(ModelInputs, Detector):
    r"""Heatmap-based OOD detection: a decoder maps the classifier's view of an input to a heatmap,
    trained to be zero on ID data and, on auxiliary outliers, to turn the input into an ID image.

    With penultimate features :math:`z = \phi(x)`, min-max normalised by the ID-train extremes
    :math:`\tilde z = (z - m) / (M - m)` (two scalars, as the official code), and the predicted class
    :math:`\hat c`, the decoder gives :math:`h = g(\tilde z, \operatorname{onehot}(\hat c))` and
    :math:`\hat x = x + h`. Training (the classifier frozen) minimises

    .. math:: \mathcal L = \tfrac1B \sum_b \sum_{\text{pixels}} (1 + 5|t_b|)\,(\hat x_b - t_b)^2

    with target :math:`t = x` for ID samples (heatmap :math:`\to 0`) and, for an outlier, the ID
    training image whose features are nearest to its own among those predicted as the same class
    (any class when none is). Score:

    .. math:: s(x) = \operatorname{mean}_{\text{pixels}} \max_{\text{channels}} |h(x)|

    Adam (lr 2e-4, betas (0.5, 0.999)), batch 200, 150 epochs and 10,000 outliers in the paper. The
    frozen classifier runs once over the training data (no augmentation, so its features do not
    change between epochs); only the decoder trains. ``fit(loader)`` follows pytorch-ood's
    convention: batches ``(x, y)`` with ``y >= 0`` for ID samples and ``y < 0`` for auxiliary outliers.
    The score is per sample (the decoder's batch norms are in eval mode): batch independent.

    Paper: Hornauer & Belagiannis, "Heatmap-based Out-of-Distribution Detection", WACV 2023
    (arXiv:2211.08115); code https://github.com/jhornauer/heatmap_ood.
    pytorch-ood 0.4.0 has no such detector.

    :param model: the classifier, with ``features`` (penultimate) and ``head`` (see ``ood_core.backbones``)
    """

    requires_fit: ClassVar[bool] = True
    needs_outliers: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "epochs": Param(Interval(int, 1, None), doc="decoder training epochs"),
        "lr": Param(Interval(float, 0, math.inf, closed="neither"), doc="Adam learning rate"),
        "batch_size": Param(Interval(int, 1, None), doc="decoder training batch size"),
        "num_outliers": Param(Interval(int, 1, None), None, doc="outliers used (a seeded subset); None: all"),
        "width": Param(Interval(int, 1, None), doc="channels of the decoder's first block (halved per upsampling)"),
        "latent_dim": Param(Interval(int, 1, None), doc="size of the decoder's first linear layer"),
        "seed": Param(Interval(int, 0, None), doc="seed of the decoder's initialisation, outlier subset, batch order"),
    }

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, epochs: int = 150, lr: float = 2e-4,
                 batch_size: int = 200, num_outliers: Optional[int] = None, width: int = 512,
                 latent_dim: int = 100, seed: int = 0):
        super().__init__(model)
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.num_outliers = num_outliers
        self.width = width
        self.latent_dim = latent_dim
        self.seed = seed
        self.decoder: Optional[HeatmapDecoder] = None
        self.z_min: Optional[float] = None  #: m, the smallest ID-train feature value
        self.z_max: Optional[float] = None  #: M, the largest ID-train feature value
        self.losses: List[float] = []  #: mean training loss per epoch

    def _network(self) -> nn.Module:
        model = self._require_model()
        if not (hasattr(model, "features") and hasattr(model, "head")):
            raise DetectorError("HeatmapOOD: the model needs features(x) (penultimate) and head (the classifier)")
        return model

    @torch.no_grad()
    def _encode(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Penultimate features and predicted class of inputs ``x``."""
        model = self._network()
        z = model.features(x)
        return z.float(), model.head(z).argmax(dim=1)

    def _normalise(self, z: Tensor) -> Tensor:
        return (z - self.z_min) / max(self.z_max - self.z_min, 1e-12)

    def fit(self, data_loader) -> "HeatmapOOD":
        """Train the decoder on a loader of ``(x, y)`` batches (``y < 0``: auxiliary outlier)."""
        self._network()
        xs, zs, preds, ys = [], [], [], []
        for x, y in self._batches(data_loader):
            if y is None:
                raise InvalidInputError("HeatmapOOD: batches must be (x, y), y < 0 marking auxiliary outliers")
            z, pred = self._encode(x)
            xs.append(x.detach())
            zs.append(z)
            preds.append(pred)
            ys.append(y)
        if not xs:
            raise InvalidInputError("HeatmapOOD: the training loader is empty")
        return self.fit_arrays(torch.cat(xs), torch.cat(zs), torch.cat(preds), torch.cat(ys))

    def fit_arrays(self, x: Tensor, z: Tensor, pred: Tensor, y: Tensor) -> "HeatmapOOD":
        """Train the decoder from inputs ``x`` ``(N, C, H, W)``, their features ``z`` ``(N, D)``, the
        classifier's predictions ``pred`` ``(N,)`` and labels ``y`` (``< 0``: auxiliary outlier)."""
        x = check_input(self, x, ndim=4, name="inputs")
        z = check_input(self, z, ndim=2, name="features")
        pred, y = pred.to(x.device), torch.as_tensor(y, device=x.device)
        ood = y < 0
        if not bool((~ood).any()):
            raise InvalidInputError("HeatmapOOD: the training data has no ID samples (labels >= 0)")
        if not bool(ood.any()):
            raise InvalidInputError("HeatmapOOD: the training data has no auxiliary outliers (labels < 0); "
                                    "the decoder learns from them")
        gen = torch.Generator().manual_seed(int(self.seed))
        id_idx, ood_idx = (~ood).nonzero().flatten(), ood.nonzero().flatten()
        if self.num_outliers is not None and self.num_outliers < ood_idx.numel():
            keep = torch.randperm(ood_idx.numel(), generator=gen)[: int(self.num_outliers)].sort().values
            ood_idx = ood_idx[keep.to(ood_idx.device)]
        z_id = z[id_idx]
        self.z_min, self.z_max = float(z_id.min()), float(z_id.max())
        # targets: ID images themselves; for each outlier, the nearest ID image of its predicted class
        inputs = torch.cat([id_idx, ood_idx])
        targets = torch.cat([id_idx, id_idx[nearest_same_class(z[ood_idx], pred[ood_idx], z_id, pred[id_idx])]])

        with torch.random.fork_rng(devices=[]):  # the decoder is initialised on the CPU, then moved
            torch.random.default_generator.manual_seed(int(self.seed))
            num_classes = self._num_classes() or int(pred.max()) + 1
            self.decoder = HeatmapDecoder(z.shape[1], num_classes, tuple(x.shape[1:]), int(self.width),
                                          int(self.latent_dim)).to(x.device)
        opt = torch.optim.Adam(self.decoder.parameters(), lr=self.lr, betas=(0.5, 0.999))
        z_norm = self._normalise(z)
        self.decoder.train()
        self.losses = []
        for _ in range(int(self.epochs)):
            order = torch.randperm(inputs.numel(), generator=gen).to(x.device)
            total = torch.zeros((), dtype=torch.float64, device=x.device)
            for b in order.split(int(self.batch_size)):
                src, tgt = inputs[b], targets[b]
                loss = weighted_reconstruction_loss(x[src] + self.decoder(z_norm[src], pred[src]), x[tgt]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * b.numel()
            self.losses.append(float(total) / order.numel())
        self.decoder.eval()
        self._mark_fitted()
        return self

    def _num_classes(self) -> Optional[int]:
        head = getattr(self.model, "head", None)
        return int(head.out_features) if isinstance(head, nn.Linear) else None

    @torch.no_grad()
    def heatmap(self, x: Tensor) -> Tensor:
        """The heatmap ``h(x)`` ``(N, C, H, W)`` of inputs ``x``."""
        self._require_fit()
        x = self._model_input(x)
        if tuple(x.shape[1:]) != self.decoder.image_shape:
            raise InvalidInputError(f"HeatmapOOD: inputs of shape {tuple(x.shape[1:])}, "
                                    f"fitted on {self.decoder.image_shape}")
        z, pred = self._encode(x)
        return self.decoder(self._normalise(z), pred)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return heatmap_score(self.heatmap(x))
