"""Supervised training of a backbone classifier (plain function: no Ray, no MLflow).

:func:`train_classifier` runs SGD (momentum, optionally Nesterov, weight decay) on a training objective
(:mod:`ood_core.objectives`: cross entropy with optional label smoothing by default; LogitNorm, outlier
exposure, energy regularisation of the logits or of intermediate layers) under a learning-rate schedule:

* ``cosine``: ``lr_t = min_lr + (lr - min_lr) (1 + cos(pi t / T)) / 2`` with ``t`` counting optimizer
  steps (OpenOOD's per-step cosine annealing); ``cosine_epoch``: the same per epoch;
* ``multistep``: ``lr * gamma ** (number of milestones <= epoch)``; ``constant``: ``lr``.

Batches are augmented on the device (:mod:`ood_core.augment`: ``none``, ``flip``, ``crop_flip``,
``crop_flip_rotate_jitter_erase``). After every epoch the model is evaluated on the validation
set; the weights with the best validation accuracy are restored at the end.

The objective ``la_ood_cotrain`` (LA-OOD co-training, :mod:`ood_core.cotraining`) adds a phase after these
``epochs`` of cross entropy: from the best weights, ``cotrain_epochs`` more epochs (numbered on from
``epochs``) fine-tune the network against frozen per-layer one-class SVMs with the objective's own SGD
settings; the final co-trained weights are kept.

With ``resume_uri``, a resume checkpoint (model, optimizer, scheduler, AMP scaler, random states,
history, best weights) is written atomically after every epoch, and training continues from it
when it exists: a retried task loses at most one epoch and ends with the same weights as an
uninterrupted run (on CPU, bit for bit).

On CUDA it uses automatic mixed precision (``torch.autocast`` float16 + ``GradScaler``), channels-last
weights and fused SGD. An in-memory data set (``TensorDataset``, or the raw images of an
``ArrayImageDataset``) of at most a quarter of the free GPU memory (4 GiB at most) is copied to the GPU
once and batched there (:class:`DeviceBatches`, in the shuffling ``DataLoader``'s order); other data sets
go through a ``DataLoader`` with pinned host memory. On CPU it runs in float32 and is fully
deterministic for a given ``seed`` (shuffling, augmentation and dropout draw from generators seeded
with it; seed the initial weights with ``build_model(..., seed=...)``).

:data:`RECIPES` holds named settings; :func:`make_train_config` applies one plus overrides.
"""
from __future__ import annotations

import bisect
import io
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ood_core import storage
from ood_core.augment import AUGMENTATIONS, BatchAugment
from ood_core.datasets.base import ArrayImageDataset, to_format
from ood_core.errors import TrainingDivergedError
from ood_core.objectives import COTRAINING, check_layers, make_objective, objective_loss

SCHEDULES = ("cosine", "cosine_epoch", "multistep", "constant")
RESUME_FORMAT = "ood-sweep-resume"
RESUME_VERSION = 1


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`train_classifier` (``amp`` only has an effect on CUDA)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    min_lr: float = 0.0
    milestones: Tuple[int, ...] = ()
    gamma: float = 0.1
    label_smoothing: float = 0.0
    augment: str = "none"
    crop_padding: int = 4
    amp: bool = True
    num_workers: int = 0
    #: the training objective (:mod:`ood_core.objectives`): ``{"name": ..., **params}``, a name, or None
    #: (cross entropy); normalised to the dict with every parameter filled in
    objective: Any = None

    def __post_init__(self) -> None:
        problems = []
        try:
            self.objective = make_objective(self.objective).to_dict()
        except ValueError as exc:
            problems.append(f"objective: {exc}")
        if int(self.epochs) != self.epochs or self.epochs < 1:
            problems.append(f"epochs must be a positive integer, got {self.epochs}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            problems.append(f"batch_size must be a positive integer, got {self.batch_size}")
        if not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            problems.append("nesterov needs momentum > 0")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.min_lr <= self.lr:
            problems.append(f"min_lr must be in [0, lr], got {self.min_lr}")
        try:
            self.milestones = tuple(int(m) for m in self.milestones)
        except (TypeError, ValueError):
            problems.append(f"milestones must be a list of epochs, got {self.milestones!r}")
        else:
            if list(self.milestones) != sorted(set(self.milestones)) or any(m < 1 for m in self.milestones):
                problems.append(f"milestones must be increasing positive epochs, got {list(self.milestones)}")
        if self.schedule == "multistep" and not self.milestones:
            problems.append("schedule 'multistep' needs milestones")
        if not 0 < self.gamma <= 1:
            problems.append(f"gamma must be in (0, 1], got {self.gamma}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.augment not in AUGMENTATIONS:
            problems.append(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        if int(self.crop_padding) != self.crop_padding or self.crop_padding < 0:
            problems.append(f"crop_padding must be a non-negative integer, got {self.crop_padding}")
        if int(self.num_workers) != self.num_workers or self.num_workers < 0:
            problems.append(f"num_workers must be a non-negative integer, got {self.num_workers}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    def to_dict(self) -> Dict[str, object]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        if d["objective"] == {"name": "cross_entropy"}:
            del d["objective"]  # the default, left out as the sweep's train section leaves it out (stable keys)
        return d


#: Named training recipes (values for :class:`TrainConfig`).
RECIPES: Dict[str, Dict[str, Any]] = {
    # OpenOOD v1.5 CIFAR training (Zhang et al. 2023, configs/optimizers + base trainer): SGD with
    # Nesterov momentum 0.9, lr 0.1, weight decay 5e-4, batch 128, 100 epochs, per-step cosine
    # annealing to 1e-6, random crop (padding 4) + horizontal flip; best checkpoint by ID val accuracy.
    "openood_v1.5": dict(epochs=100, batch_size=128, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                         schedule="cosine", min_lr=1e-6, milestones=(), gamma=0.1, label_smoothing=0.0,
                         augment="crop_flip", crop_padding=4),
    # The practical-work notebook (ResNet18 on CIFAR-100, shared/seeds 002): SGD lr 1e-3, momentum 0.95
    # (no Nesterov), weight decay 5e-4, batch 8, 200 epochs, MultiStepLR [60, 120, 160] x 0.2,
    # crop + flip + rotation 15 + colour jitter (0.2, 0.2, 0.2, 0.1) + random erasing 0.25.
    # The notebook also puts Dropout(0.5) before the classifier: give the backbone `dropout: 0.5`.
    "practical_cifar100": dict(epochs=200, batch_size=8, lr=1e-3, momentum=0.95, nesterov=False, weight_decay=5e-4,
                               schedule="multistep", min_lr=0.0, milestones=(60, 120, 160), gamma=0.2,
                               label_smoothing=0.0, augment="crop_flip_rotate_jitter_erase", crop_padding=4),
}


def make_train_config(recipe: Optional[str] = None, **overrides: Any) -> TrainConfig:
    """:class:`TrainConfig` from recipe ``recipe`` (None: the plain defaults) with ``overrides``
    on top (``None`` values are ignored). ``ValueError`` for an unknown recipe or field."""
    base: Dict[str, Any] = {}
    if recipe is not None:
        if recipe not in RECIPES:
            raise ValueError(f"unknown training recipe {recipe!r}; known: {', '.join(sorted(RECIPES))}")
        base = dict(RECIPES[recipe])
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {', '.join(sorted(names))}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**base)


class DeviceBatches:
    """Batches of an in-memory data set kept on the GPU: what ``DataLoader(ds, batch_size,
    shuffle=generator is not None, generator=generator)`` yields, in the same order (a ``DataLoader`` over
    the indices draws each epoch's permutation from the same generator), without per-sample collation or
    a host-to-device copy per batch.

    ``ds`` is a ``TensorDataset`` (its tensors are copied to ``device``) or an
    :class:`~ood_core.datasets.base.ArrayImageDataset` (its raw ``uint8`` images are copied, and each
    batch is converted to the input format on the device).
    """

    def __init__(self, ds: Dataset, batch_size: int, device: torch.device,
                 generator: Optional[torch.Generator]):
        if isinstance(ds, ArrayImageDataset):
            self.tensors = [torch.from_numpy(np.ascontiguousarray(ds.images[ds.indices])).to(device),
                            torch.from_numpy(ds.labels).to(device)]
            fmt = ds.fmt
            self.convert = lambda raw: to_format(raw.float().div_(255.0), fmt)
        elif isinstance(ds, TensorDataset):
            self.tensors = [t.to(device) for t in ds.tensors]
            self.convert = None
        else:
            raise TypeError(f"DeviceBatches: needs a TensorDataset or an ArrayImageDataset, got {type(ds).__name__}")
        self.n, self.batch_size, self.generator, self.device = len(ds), int(batch_size), generator, device

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        if self.generator is None:
            order = torch.arange(self.n, device=self.device)
        else:
            # exhausted, as a training epoch exhausts its loader (the sampler draws once more at the end)
            order = torch.cat(list(DataLoader(range(self.n), batch_size=self.n, shuffle=True,
                                              generator=self.generator))).to(self.device)
        for start in range(0, self.n, self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = [t[idx] for t in self.tensors]
            if self.convert is not None:
                batch[0] = self.convert(batch[0])
            yield tuple(batch)


def _fits_on_device(ds: Dataset, device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    if isinstance(ds, TensorDataset):
        size = sum(t.numel() * t.element_size() for t in ds.tensors)
    elif isinstance(ds, ArrayImageDataset):
        size = len(ds) * (int(np.prod(ds.images.shape[1:])) + 8)
    else:
        return False
    free, _total = torch.cuda.mem_get_info(device)
    return size <= min(4 * 2**30, free // 4)


def _loader(ds: Dataset, batch_size: int, cfg: TrainConfig, device: torch.device,
            generator: Optional[torch.Generator]):
    if _fits_on_device(ds, device):
        return DeviceBatches(ds, batch_size, device, generator)
    cuda = device.type == "cuda"
    return DataLoader(ds, batch_size=batch_size, shuffle=generator is not None, generator=generator,
                      num_workers=cfg.num_workers, pin_memory=cuda, drop_last=False,
                      persistent_workers=cfg.num_workers > 0)


def _cycle(loader):
    """The loader's batches, starting over (a fresh shuffle) when it runs out."""
    while True:
        yield from loader


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, cuda: bool):
    x = x.to(device, non_blocking=cuda)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=cuda)


@torch.no_grad()
def _evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool) -> Dict[str, float]:
    cuda = device.type == "cuda"
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    for x, y in loader:
        x, y = _to_device(x, y, device, cuda)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        n += len(y)
    model.train(was_training)
    if n == 0:
        return {"loss": math.nan, "acc": math.nan}
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n}


def evaluate_classifier(model: nn.Module, dataset: Dataset, *, device: Union[str, torch.device],
                        batch_size: int = 256, amp: bool = True) -> Dict[str, float]:
    """Mean cross entropy (no label smoothing) and accuracy of ``model`` on ``dataset``."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    loader = _loader(dataset, batch_size, TrainConfig(num_workers=0), device, None)
    return _evaluate(model.to(device), loader, device, amp and cuda)


def _check_labels(train_set: Dataset) -> None:
    y = None
    if isinstance(train_set, TensorDataset) and len(train_set.tensors) >= 2:
        y = train_set.tensors[1]
    elif getattr(train_set, "targets", None) is not None:
        y = torch.as_tensor(np.asarray(train_set.targets))
    if y is not None and y.numel() and int(y.min()) < 0:
        raise ValueError("train_classifier: the training set has negative (unlabelled) targets")


def _derived_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence(int(seed), spawn_key=(stream,)).generate_state(1, np.uint64)[0] >> 1)


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    floor = cfg.min_lr / cfg.lr
    if cfg.schedule in ("cosine", "cosine_epoch"):
        total = cfg.epochs * steps_per_epoch if cfg.schedule == "cosine" else cfg.epochs
        return lambda t: floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    if cfg.schedule == "multistep":
        milestones = list(cfg.milestones)
        return lambda e: cfg.gamma ** bisect.bisect_right(milestones, e)
    return lambda t: 1.0


def _input_format(train_set: Dataset, given) -> Tuple[Sequence[float], Sequence[float]]:
    fmt = given if given is not None else getattr(train_set, "fmt", None)
    if fmt is None:
        return (0.0,), (1.0,)
    if isinstance(fmt, dict):
        return fmt["mean"], fmt["std"]
    return fmt.mean, fmt.std


def _cpu_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _fingerprint(cfg: TrainConfig, seed: int, model: nn.Module, n_train: int) -> Dict[str, Any]:
    return {"cfg": cfg.to_dict(), "seed": int(seed), "n_train": int(n_train),
            "params": sorted(model.state_dict().keys())[:8], "n_params": len(model.state_dict())}


def _save_resume(uri: str, payload: Dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    with storage.atomic_output(uri, record_hash=True) as out:  # its sha256 is checked before resuming
        out.write(buf.getvalue())


def _load_resume(uri: str, fingerprint: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The resume payload at ``uri`` if it exists, is readable and belongs to this run; else None
    (with a warning when a file was there but unusable)."""
    found = storage.verify(uri)  # its bytes against the sha256 recorded when it was written
    if found.status == "missing":
        return None
    if found.status in ("mismatch", "unreadable"):  # damaged: set aside, start over
        warnings.warn(storage.discard_cached(uri, "resume checkpoint", found.detail, "training from the first epoch"))
        return None
    try:  # intact, or without a record (an older ood-sweep): the checks below decide
        payload = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / partial / foreign file: start over
        warnings.warn(f"ignoring unreadable resume checkpoint {uri}: {type(exc).__name__}: {exc}")
        return None
    if not isinstance(payload, dict) or payload.get("format") != RESUME_FORMAT \
            or payload.get("version") != RESUME_VERSION:
        warnings.warn(f"ignoring {uri}: not an ood-sweep resume checkpoint")
        return None
    if payload.get("fingerprint") != fingerprint:
        warnings.warn(f"ignoring resume checkpoint {uri}: it was written for another configuration")
        return None
    return payload


def _cotrain(model: nn.Module, objective, cfg: TrainConfig, history: List[Dict[str, float]],
             resumed: Optional[Dict[str, Any]], best_state: Optional[Dict[str, torch.Tensor]], *, seed: int,
             device: torch.device, train_set: Dataset, train_loader, val_loader, augment: BatchAugment,
             use_amp: bool, probe, on_epoch, save_resume) -> Any:
    """The co-training phase of ``la_ood_cotrain`` (:mod:`ood_core.cotraining`) after the main loop: epochs
    ``cfg.epochs + 1 ... cfg.epochs + cotrain_epochs``, appended to ``history``; resumes from ``resumed``'s
    ``"cotrain"`` state (the frozen OCSVMs, the optimizer) when it has one. Returns the CoTrainer."""
    from ood_core.cotraining import CoTrainer

    cuda = device.type == "cuda"
    total = cfg.epochs + int(objective.params["cotrain_epochs"])
    trainer = CoTrainer(model, objective, amp=use_amp, fused=cuda)
    unshuffled = _loader(train_set, max(256, cfg.batch_size), cfg, device, None)

    def inputs(augmented: bool):
        for x, y in unshuffled:
            x, _ = _to_device(x, y, device, cuda)
            if augmented:
                x = augment(x)
            yield x.contiguous(memory_format=torch.channels_last) if cuda else x

    if resumed is not None and "cotrain" in resumed:
        trainer.load_state_dict(resumed["cotrain"])  # the model is the resumed co-training epoch's
    elif len(history) < total:
        if best_state is not None:  # co-train the best weights of the main loop
            model.load_state_dict(best_state)
        trainer.fit(inputs(augmented=False), seed=_derived_seed(seed, 4) % 2**31)
    for epoch in range(len(history) + 1, total + 1):
        start = time.perf_counter()
        trainer.standardise(inputs(augmented=True))  # this epoch's m_l, sigma_l (eval mode, augmented batches)
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        term_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        for x, y in train_loader:
            x, y = _to_device(x, y, device, cuda)
            x = augment(x)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            loss, logits, term = trainer.step(x, y, cfg.label_smoothing)
            loss_sum += loss.double() * len(y)
            term_sum += term.double()
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        train_loss = loss_sum.item() / seen
        if not math.isfinite(train_loss):
            raise TrainingDivergedError(f"train_classifier: co-training loss is {train_loss} in epoch {epoch} "
                                        f"(lr={trainer.lr:g}); lower the objective's lr")
        val = _evaluate(model, val_loader, device, use_amp) if val_loader is not None \
            else {"loss": math.nan, "acc": math.nan}
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": correct.item() / seen,
               "val_loss": val["loss"], "val_acc": val["acc"], "lr": trainer.lr,
               "ocsvm_term": term_sum.item() / seen, "time_s": time.perf_counter() - start}
        if probe is not None:
            row.update({k: float(v) for k, v in probe(model).items()})
        history.append(row)
        if save_resume is not None:
            save_resume(trainer.state_dict())
        if on_epoch is not None:
            on_epoch(dict(row))
    return trainer


def train_classifier(model: nn.Module, train_set: Dataset, val_set: Optional[Dataset], cfg: TrainConfig, *,
                     seed: int, device: Union[str, torch.device],
                     on_epoch: Optional[Callable[[Dict[str, float]], None]] = None,
                     resume_uri: Optional[str] = None, input_format: Any = None,
                     probe: Optional[Callable[[nn.Module], Dict[str, float]]] = None,
                     outlier_set: Optional[Dataset] = None) -> List[Dict[str, float]]:
    """Train ``model`` in place on ``train_set``; return one dict per epoch (resumed ones included).

    Each dict has ``epoch`` (1-based), ``train_loss`` (mean training criterion, with label
    smoothing), ``train_acc`` (in train mode, as the batches went by), ``val_loss`` (plain
    cross entropy) and ``val_acc`` (NaN without a validation set), ``lr`` (the rate of the
    epoch's first step) and ``time_s``. ``on_epoch`` is called with each new epoch's dict.

    ``probe``: measurements of the model after each epoch's validation (the neural-collapse diagnostics,
    :class:`ood_core.neural_collapse.CollapseProbe`); the floats it returns join that epoch's row (and the
    resume checkpoint's history). It must neither change the model nor draw from the global random state,
    so that it leaves the weights as they would be without it; its time is not in ``time_s`` (it reports
    its own).

    ``resume_uri``: path / URI of the resume checkpoint (see the module docstring); it is left in
    place at the end (the caller removes it once the final checkpoint is saved).
    ``input_format``: the :class:`~ood_core.data.InputFormat` (or its dict) of the batches, for
    augmentations that need raw pixels; default ``train_set.fmt`` when it has one.

    ``cfg.objective`` picks the loss (:mod:`ood_core.objectives`). The objectives that train on auxiliary
    outliers need ``outlier_set`` (labels ignored): every ID batch is paired with a batch of ``batch_size``
    outliers (augmented like the ID batch) and both go through one forward pass. The outliers are reshuffled
    every epoch by their own generator seeded from ``seed`` (cycled when there are fewer than an epoch needs),
    so a resumed run sees the same pairs.

    At the end ``model`` holds the weights of the epoch with the best validation accuracy
    (the earliest on ties; the last epoch without a validation set), is on ``device`` in
    eval mode. With ``la_ood_cotrain``, the co-training epochs follow (they start from those best weights; their
    rows add ``ocsvm_term``, the epoch's mean of the detector term of :func:`ood_core.cotraining.detector_term`
    per sample) and ``model`` ends with the last co-training epoch's weights. Raises
    :class:`~ood_core.errors.TrainingDivergedError` (a ``FloatingPointError``) if the
    training loss becomes NaN / inf.
    """
    if len(train_set) == 0:
        raise ValueError("train_classifier: the training set is empty")
    _check_labels(train_set)
    objective = make_objective(cfg.objective)
    if objective.needs_outliers and (outlier_set is None or len(outlier_set) == 0):
        raise ValueError(f"train_classifier: objective {objective.name!r} trains on auxiliary outliers; "
                         "pass a non-empty outlier_set")
    if not objective.needs_outliers:
        outlier_set = None
    check_layers(model, objective)
    device = torch.device(device)
    cuda = device.type == "cuda"
    use_amp = bool(cfg.amp and cuda)
    if cuda:
        torch.backends.cudnn.benchmark = True
    model.to(device=device, memory_format=torch.channels_last if cuda else torch.contiguous_format)

    shuffle_gen = torch.Generator().manual_seed(int(seed))
    aug_gen = torch.Generator().manual_seed(_derived_seed(seed, 1))
    mean, std = _input_format(train_set, input_format)
    augment = BatchAugment(cfg.augment, mean=mean, std=std, padding=cfg.crop_padding, generator=aug_gen)
    train_loader = _loader(train_set, cfg.batch_size, cfg, device, shuffle_gen)
    val_loader = _loader(val_set, max(256, cfg.batch_size), cfg, device, None) if val_set is not None else None
    outlier_gen = torch.Generator().manual_seed(_derived_seed(seed, 3)) if outlier_set is not None else None
    outlier_loader = _loader(outlier_set, cfg.batch_size, cfg, device, outlier_gen) if outlier_set is not None else None

    # fused on CUDA: one kernel for the whole update, and the AMP scaler's inf check needs no host sync
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, **({"fused": True} if cuda else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, len(train_loader)))
    per_step = cfg.schedule == "cosine"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    history: List[Dict[str, float]] = []
    best_acc, best_state = -math.inf, None
    cotrainer = None  # the co-training phase's state (la_ood_cotrain), once it has started
    fingerprint = _fingerprint(cfg, seed, model, len(train_set))
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []

    def save_resume(cotrain_state: Optional[Dict[str, Any]] = None) -> None:
        _save_resume(resume_uri, {
            "format": RESUME_FORMAT, "version": RESUME_VERSION, "fingerprint": fingerprint,
            "model": _cpu_state(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "rng": {"shuffle": shuffle_gen.get_state(), "augment": aug_gen.get_state(),
                    **({"outliers": outlier_gen.get_state()} if outlier_gen is not None else {}),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if cuda else None},
            "history": history, "best_acc": best_acc, "best_state": best_state,
            **({"cotrain": cotrain_state} if cotrain_state is not None else {})})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_derived_seed(seed, 2))  # dropout & co.: seeded, global state restored after
        resumed = _load_resume(resume_uri, fingerprint) if resume_uri else None
        if resumed is not None:
            model.load_state_dict(resumed["model"])
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
            if resumed.get("scaler"):
                scaler.load_state_dict(resumed["scaler"])
            rng = resumed["rng"]
            shuffle_gen.set_state(rng["shuffle"])
            aug_gen.set_state(rng["augment"])
            if outlier_gen is not None:
                outlier_gen.set_state(rng["outliers"])
            torch.set_rng_state(rng["torch"])
            if cuda and rng.get("cuda") is not None:
                torch.cuda.set_rng_state(rng["cuda"], device)
            history = [dict(r) for r in resumed["history"]]
            best_acc = float(resumed["best_acc"])
            best_state = resumed["best_state"]

        for epoch in range(len(history) + 1, cfg.epochs + 1):
            start = time.perf_counter()
            model.train()
            lr_now = optimizer.param_groups[0]["lr"]
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            outliers = _cycle(outlier_loader) if outlier_loader is not None else None
            for x, y in train_loader:
                x, y = _to_device(x, y, device, cuda)
                x = augment(x)
                x_out = None
                if outliers is not None:
                    x_out, _ = _to_device(*next(outliers), device, cuda)
                    x_out = augment(x_out)
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                    loss, logits = objective_loss(model, objective, x, y, x_out, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if per_step:
                    scheduler.step()
                loss_sum += loss.detach().double() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
            if not per_step:
                scheduler.step()
            train_loss = loss_sum.item() / seen
            if not math.isfinite(train_loss):
                raise TrainingDivergedError(f"train_classifier: training loss is {train_loss} in epoch {epoch} "
                                            f"(lr={lr_now:g}); lower the learning rate")
            val = _evaluate(model, val_loader, device, use_amp) if val_loader is not None \
                else {"loss": math.nan, "acc": math.nan}
            row = {"epoch": epoch, "train_loss": train_loss, "train_acc": correct.item() / seen,
                   "val_loss": val["loss"], "val_acc": val["acc"], "lr": lr_now,
                   "time_s": time.perf_counter() - start}
            if probe is not None:
                row.update({k: float(v) for k, v in probe(model).items()})
            history.append(row)
            if val_loader is not None and val["acc"] > best_acc:
                best_acc = val["acc"]
                best_state = _cpu_state(model)
            if resume_uri:
                save_resume()
            if on_epoch is not None:
                on_epoch(dict(row))

        if objective.name in COTRAINING:
            cotrainer = _cotrain(model, objective, cfg, history, resumed, best_state, seed=seed, device=device,
                                 train_loader=train_loader, train_set=train_set, val_loader=val_loader,
                                 augment=augment, use_amp=use_amp, probe=probe, on_epoch=on_epoch,
                                 save_resume=save_resume if resume_uri else None)

    if best_state is not None and cotrainer is None:
        model.load_state_dict(best_state)
    if cuda:
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    return history
