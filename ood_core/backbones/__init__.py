"""Backbone architectures; the public registry is :mod:`ood_core.models`."""
