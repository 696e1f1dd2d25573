"""Inputs shared by the detector tests."""
import torch


def degenerate_features():
    """Feature matrices that break naive covariance code (more dimensions than rows, low rank, constant
    columns, constant data, duplicated rows) with labels, and the generator, for cases of a test's own."""
    g = torch.Generator().manual_seed(4)
    y60 = torch.arange(60) % 3
    partly_constant = torch.randn(60, 16, generator=g)
    partly_constant[:, :5] = 2.0
    return {
        "d_gt_n": (torch.randn(20, 64, generator=g), torch.arange(20) % 3),
        "low_rank": (torch.randn(60, 3, generator=g) @ torch.randn(3, 16, generator=g), y60),
        "partly_constant": (partly_constant, y60),
        "constant": (torch.full((60, 16), 1.5), y60),
        "duplicated": (torch.randn(10, 16, generator=g).repeat(6, 1), y60),
    }, g
