"""Data-set implementations; the public registry is :mod:`ood_core.data`."""
