"""Training-time data augmentation on whole batches, on the batch's device.

The batches a data set yields are already normalised (``(x - mean) / std``, see
:mod:`ood_core.data`), so every operation that needs raw pixels works on ``x * std + mean`` and
normalises again; padding and rotation fill with raw black (0), as torchvision's transforms do on
PIL images. Random numbers come from a CPU ``torch.Generator`` (then moved to the device), so a
seed gives the same augmentations on CPU and GPU.

=================================  ====================================================================
``none``                           nothing
``flip``                           horizontal flip with probability 1/2
``crop_flip``                      ``RandomCrop(size, padding)`` + flip: the OpenOOD v1.5 / standard
                                   CIFAR recipe
``crop_flip_rotate_jitter_erase``  crop + flip + ``RandomRotation(15)`` (nearest) + ``ColorJitter(0.2,
                                   0.2, 0.2, 0.1)`` (the four in a random order per batch) +
                                   ``RandomErasing(p=0.25)`` on the normalised image (value 0): the
                                   practical-work notebook's recipe
=================================  ====================================================================
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

AUGMENTATIONS = ("none", "flip", "crop_flip", "crop_flip_rotate_jitter_erase")
LUMA = (0.299, 0.587, 0.114)


class BatchAugment:
    """Callable ``x (N, C, H, W) normalised -> augmented x`` (same device, dtype float32)."""

    def __init__(self, kind: str, *, mean: Sequence[float], std: Sequence[float], padding: int = 4,
                 generator: Optional[torch.Generator] = None, rotation: float = 15.0,
                 jitter: Sequence[float] = (0.2, 0.2, 0.2, 0.1), erase_p: float = 0.25):
        if kind not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {kind!r}")
        self.kind, self.padding = kind, int(padding)
        self.mean = torch.tensor([float(m) for m in mean])
        self.std = torch.tensor([float(s) for s in std])
        self.gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self.rotation, self.jitter, self.erase_p = float(rotation), tuple(float(j) for j in jitter), float(erase_p)
        self._stats_key, self._stats_cache = None, None  # mean / std on the last (device, dtype, channels)

    # random numbers on CPU from our generator, then on the device
    def _rand(self, *shape: int, device) -> Tensor:
        return host_to(torch.rand(*shape, generator=self.gen), device)

    def _stats(self, x: Tensor):
        c = x.shape[1]
        key = (x.device, x.dtype, c)
        if self._stats_key != key:
            mean, std = self.mean, self.std
            if len(mean) != c:
                mean, std = mean[:1].expand(c), std[:1].expand(c)
            self._stats_cache = (host_to(mean.to(x.dtype).reshape(1, c, 1, 1), x.device),
                                 host_to(std.to(x.dtype).reshape(1, c, 1, 1), x.device))
            self._stats_key = key
        return self._stats_cache

    def __call__(self, x: Tensor) -> Tensor:
        if self.kind == "none":
            return x
        mean, std = self._stats(x)
        black = -mean / std  # raw 0 in normalised units
        if self.kind in ("crop_flip", "crop_flip_rotate_jitter_erase") and self.padding > 0:
            x = self.crop(x, black)
        x = self.flip(x)
        if self.kind == "crop_flip_rotate_jitter_erase":
            x = self.rotate(x, black)
            x = (self.color_jitter((x * std + mean).clamp_(0, 1)) - mean) / std
            x = self.erase(x)
        return x

    def crop(self, x: Tensor, fill: Tensor) -> Tensor:
        """Pad by ``padding`` with ``fill`` and take a random ``H x W`` window per sample."""
        n, c, h, w = x.shape
        p = self.padding
        padded = fill.expand(n, c, h + 2 * p, w + 2 * p).clone()
        padded[:, :, p:p + h, p:p + w] = x
        off = host_to(torch.randint(0, 2 * p + 1, (2, n), generator=self.gen), x.device)
        rows = off[0][:, None] + torch.arange(h, device=x.device)  # (N, H)
        cols = off[1][:, None] + torch.arange(w, device=x.device)  # (N, W)
        batch = torch.arange(n, device=x.device)[:, None, None]
        return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()

    def flip(self, x: Tensor) -> Tensor:
        mask = self._rand(x.shape[0], device=x.device) < 0.5
        return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)

    def rotate(self, x: Tensor, fill: Tensor) -> Tensor:
        """Rotation by an angle uniform in ``[-rotation, rotation]`` degrees (nearest neighbour)."""
        n = x.shape[0]
        angle = (self._rand(n, device=x.device) * 2 - 1) * math.radians(self.rotation)
        cos, sin = torch.cos(angle), torch.sin(angle)
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x - fill, grid, mode="nearest", padding_mode="zeros", align_corners=False) + fill

    def color_jitter(self, raw: Tensor) -> Tensor:
        """Brightness, contrast, saturation, hue factors per sample, on raw pixels in [0, 1]."""
        n, c = raw.shape[:2]
        b, ct, s, hue = self.jitter

        def factor(amount: float) -> Tensor:
            return (1 - amount + 2 * amount * self._rand(n, device=raw.device)).view(-1, 1, 1, 1)

        ops = [0, 1] + ([2, 3] if c == 3 else [])
        order = torch.randperm(len(ops), generator=self.gen).tolist()
        for k in (ops[i] for i in order):
            if k == 0 and b > 0:
                raw = (raw * factor(b)).clamp(0, 1)
            elif k == 1 and ct > 0:
                m = _gray(raw).mean(dim=(1, 2, 3), keepdim=True)
                raw = ((raw - m) * factor(ct) + m).clamp(0, 1)
            elif k == 2 and s > 0:
                g = _gray(raw)
                raw = ((raw - g) * factor(s) + g).clamp(0, 1)
            elif k == 3 and hue > 0:
                shift = (self._rand(n, device=raw.device) * 2 - 1) * hue
                raw = adjust_hue(raw, shift)
        return raw

    def erase(self, x: Tensor, scale=(0.02, 0.33), ratio=(0.3, 3.3), tries: int = 10) -> Tensor:
        """torchvision's ``RandomErasing(p, scale, ratio, value=0)``, vectorised: up to ``tries``
        candidate boxes per sample, the first that fits is erased."""
        n, _, h, w = x.shape
        dev = x.device
        apply = self._rand(n, device=dev) < self.erase_p
        area = h * w * (scale[0] + (scale[1] - scale[0]) * self._rand(n, tries, device=dev))
        logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * self._rand(n, tries, device=dev)
        r = torch.exp(logr)
        eh = torch.round(torch.sqrt(area * r)).long()
        ew = torch.round(torch.sqrt(area / r)).long()
        ok = (eh < h) & (ew < w) & (eh > 0) & (ew > 0)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros(n, dtype=torch.long, device=dev))
        apply = apply & ok.any(1)
        eh = eh.gather(1, first[:, None]).squeeze(1)
        ew = ew.gather(1, first[:, None]).squeeze(1)
        top = (self._rand(n, device=dev) * (h - eh + 1).clamp(min=1)).long()
        left = (self._rand(n, device=dev) * (w - ew + 1).clamp(min=1)).long()
        rows = torch.arange(h, device=dev).view(1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, w)
        box = ((rows >= top.view(-1, 1, 1)) & (rows < (top + eh).view(-1, 1, 1))
               & (cols >= left.view(-1, 1, 1)) & (cols < (left + ew).view(-1, 1, 1)) & apply.view(-1, 1, 1))
        return x.masked_fill(box[:, None], 0.0)


def host_to(t: Tensor, device) -> Tensor:
    """``t`` (on the host) on ``device``; to a GPU through pinned memory without blocking, so that the
    per-batch random numbers never make the host wait for the GPU's queue to drain."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _gray(raw: Tensor) -> Tensor:
    if raw.shape[1] == 1:
        return raw
    return raw[:, 0:1] * LUMA[0] + raw[:, 1:2] * LUMA[1] + raw[:, 2:3] * LUMA[2]  # no host-to-device copy


def adjust_hue(rgb: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of RGB images in [0, 1] by ``shift`` (per sample, in turns, |shift| <= 0.5),
    through HSV as torchvision's ``adjust_hue`` does."""
    r, g, b = rgb.unbind(1)
    maxc, _ = rgb.max(1)
    minc, _ = rgb.min(1)
    delta = maxc - minc
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    dc = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / dc, (maxc - g) / dc, (maxc - b) / dc
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    h = ((h / 6.0) % 1.0 + shift.view(-1, 1, 1)) % 1.0
    v = maxc
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = torch.stack([
        torch.stack([v, t, p], 1), torch.stack([q, v, p], 1), torch.stack([p, v, t], 1),
        torch.stack([p, q, v], 1), torch.stack([t, p, v], 1), torch.stack([v, p, q], 1)], 0)  # (6, N, 3, H, W)
    idx = i[None, :, None].expand(1, -1, 3, -1, -1)
    return choices.gather(0, idx).squeeze(0)
