"""Data-set parameter values checked without reading any data: what ``validate`` can tell before any work.

:func:`check_values` raises :class:`~ood_core.datasets.base.DatasetParamError` naming the parameter (or
``split``) for a value the data set cannot use: ``classes: []``, ``classes: [99]`` for the 10 digits,
``n: -5``, ``fractions: [0.5, 0.5, 0.5]``, ``val_size: 0`` for a ``val`` split... The builders raise the
same errors when they run, so a value found only with the files (``val_size`` larger than the data)
still ends as one line naming the parameter.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional

from .base import DatasetParamError, check_classes, check_count, check_fractions


def _non_empty_str(name: str, key: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise DatasetParamError(key, f"dataset {name!r}: {key} must be a non-empty string, got {value!r}")


def _bool(name: str, key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise DatasetParamError(key, f"dataset {name!r}: {key} must be true or false, got {value!r}")


def _str_list(name: str, key: str, value: Any) -> None:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise DatasetParamError(key, f"dataset {name!r}: {key} must be a list of names, got {value!r}")


def _choice(*allowed: str) -> Callable[[str, str, Any], None]:
    def check(name: str, key: str, value: Any) -> None:
        if value not in allowed:
            raise DatasetParamError(key, f"dataset {name!r}: {key} must be one of {list(allowed)}, got {value!r}")
    return check


def _patch(name: str, key: str, value: Any) -> None:
    from .sklearn_sets import check_photo_patch

    check_photo_patch(value)


#: parameter name -> check(dataset, parameter, value), for a value that is not None
_CHECKS: Dict[str, Callable[[str, str, Any], None]] = {
    "fractions": lambda name, key, v: check_fractions(name, v),
    "n": lambda name, key, v: check_count(name, key, v, minimum=1),
    "val_size": lambda name, key, v: check_count(name, key, v),
    "max_samples": lambda name, key, v: check_count(name, key, v, minimum=1),
    "patch": _patch,
    "test_pool": _choice("test", "all"),
    "layout": _choice("auto", "class", "flat"),
    "path": _non_empty_str,
    "root": _non_empty_str,
    "download": _bool,
    "exclude_wnids": _str_list,
    "set": _non_empty_str,  # OpenOOD benchmarks: which list (checked against the catalogue by the builder)
    "pre_size": lambda name, key, v: check_count(name, key, v, minimum=1),
}

#: data sets with no train split (their builders refuse it)
_OOD_ONLY = ("textures", "places365", "lsun_crop", "lsun_resize", "isun")


def check_values(name: str, build: Callable[..., Any], split: str, params: Dict[str, Any],
                 num_classes: Optional[int] = None) -> None:
    """Check the values of ``params`` for data set ``name`` (builder ``build``, split ``split``, static class
    count ``num_classes`` when known); raise :class:`DatasetParamError` naming the first bad parameter.

    Parameter *names* are checked by the caller (against ``build``'s signature); values that depend on the
    files (a ``val_size`` larger than the data) are left to the builder.
    """
    for key, value in params.items():
        if value is None:
            continue
        if key == "classes":
            check_classes(name, value, num_classes)
        elif key in _CHECKS:
            _CHECKS[key](name, key, value)
    sig = inspect.signature(build)
    full = {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
    full.update(params)
    if name == "image_folder" and not full.get("path"):
        raise DatasetParamError("path", "dataset 'image_folder': params.path must name a local folder of images")
    if name in _OOD_ONLY and split == "train":
        raise DatasetParamError("split", f"dataset {name!r} is an OOD-only set: it has val and test splits, "
                                "no train split")
    if full.get("test_pool") == "all" and split == "train":
        raise DatasetParamError("test_pool", f"dataset {name!r}: test_pool 'all' pools the training images into "
                                "val/test; the train split is not available then")
    if split == "val" and "val_size" in full and full["val_size"] is not None and int(full["val_size"]) == 0:
        raise DatasetParamError("val_size", f"dataset {name!r}: the val split is empty with val_size 0; give "
                                "val_size > 0 (and the same val_size to its test entry)")
