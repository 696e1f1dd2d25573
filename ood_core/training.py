"""Supervised training of a backbone classifier (plain function: no Ray, no MLflow).

:func:`train_classifier` runs SGD (Nesterov momentum, weight decay) on cross entropy (with
optional label smoothing) under a cosine learning-rate schedule
``lr_t = lr * (1 + cos(pi * t / T)) / 2`` (``t`` counts optimizer steps for
``schedule="cosine"``, epochs for ``"cosine_epoch"``; ``"constant"`` keeps ``lr``).
After every epoch the model is evaluated on the validation set; the weights with the best
validation accuracy are restored at the end.

On CUDA it uses automatic mixed precision (``torch.autocast`` float16 + ``GradScaler``),
channels-last memory format and pinned host memory; on CPU it runs in float32 and is fully
deterministic for a given ``seed`` (the shuffling order comes from a ``torch.Generator``
seeded with it; seed the initial weights with ``build_model(..., seed=...)``).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

SCHEDULES = ("cosine", "cosine_epoch", "constant")


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
    label_smoothing: float = 0.0
    amp: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        problems = []
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
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if int(self.num_workers) != self.num_workers or self.num_workers < 0:
            problems.append(f"num_workers must be a non-negative integer, got {self.num_workers}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


def _loader(ds: Dataset, batch_size: int, cfg: TrainConfig, cuda: bool,
            generator: Optional[torch.Generator]) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=generator is not None, generator=generator,
                      num_workers=cfg.num_workers, pin_memory=cuda, drop_last=False,
                      persistent_workers=cfg.num_workers > 0)


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
    loader = _loader(dataset, batch_size, TrainConfig(num_workers=0), cuda, None)
    return _evaluate(model.to(device), loader, device, amp and cuda)


def _check_labels(train_set: Dataset) -> None:
    if isinstance(train_set, TensorDataset) and len(train_set.tensors) >= 2:
        y = train_set.tensors[1]
        if y.numel() and int(y.min()) < 0:
            raise ValueError("train_classifier: the training set has negative (unlabelled) targets")


def train_classifier(model: nn.Module, train_set: Dataset, val_set: Optional[Dataset], cfg: TrainConfig, *,
                     seed: int, device: Union[str, torch.device],
                     on_epoch: Optional[Callable[[Dict[str, float]], None]] = None) -> List[Dict[str, float]]:
    """Train ``model`` in place on ``train_set``; return one dict per epoch.

    Each dict has ``epoch`` (1-based), ``train_loss`` (mean training criterion, with label
    smoothing), ``train_acc`` (in train mode, as the batches went by), ``val_loss`` (plain
    cross entropy) and ``val_acc`` (NaN without a validation set), ``lr`` (the rate of the
    epoch's first step) and ``time_s``. ``on_epoch`` is called with each dict as it is made.

    At the end ``model`` holds the weights of the epoch with the best validation accuracy
    (the earliest on ties; the last epoch without a validation set), is on ``device`` in
    eval mode. Raises ``FloatingPointError`` if the training loss becomes NaN / inf.
    """
    if len(train_set) == 0:
        raise ValueError("train_classifier: the training set is empty")
    _check_labels(train_set)
    device = torch.device(device)
    cuda = device.type == "cuda"
    use_amp = bool(cfg.amp and cuda)
    model.to(device=device, memory_format=torch.channels_last if cuda else torch.contiguous_format)

    train_loader = _loader(train_set, cfg.batch_size, cfg, cuda, torch.Generator().manual_seed(int(seed)))
    val_loader = _loader(val_set, max(256, cfg.batch_size), cfg, cuda, None) if val_set is not None else None

    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(train_loader) if cfg.schedule == "cosine" else cfg.epochs
    scheduler = None
    if cfg.schedule != "constant":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total)))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    history: List[Dict[str, float]] = []
    best_acc, best_state = -math.inf, None
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        model.train()
        lr_now = optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        for x, y in train_loader:
            x, y = _to_device(x, y, device, cuda)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                logits = model(x)
                loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None and cfg.schedule == "cosine":
                scheduler.step()
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        if scheduler is not None and cfg.schedule == "cosine_epoch":
            scheduler.step()
        train_loss = loss_sum.item() / seen
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"train_classifier: training loss is {train_loss} in epoch {epoch} "
                                     f"(lr={lr_now:g}); lower the learning rate")
        val = _evaluate(model, val_loader, device, use_amp) if val_loader is not None \
            else {"loss": math.nan, "acc": math.nan}
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": correct.item() / seen,
               "val_loss": val["loss"], "val_acc": val["acc"], "lr": lr_now,
               "time_s": time.perf_counter() - start}
        history.append(row)
        if val_loader is not None and val["acc"] > best_acc:
            best_acc = val["acc"]
            best_state = copy.deepcopy(model.state_dict())
        if on_epoch is not None:
            on_epoch(dict(row))

    if best_state is not None:
        model.load_state_dict(best_state)
    if cuda:
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    return history
