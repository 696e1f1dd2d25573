"""Thin Ray-facing functions: train, extract, evaluate.

Each function takes plain data (dicts of the plan), does its work through ``ood_core`` and
returns plain data. They know about devices, threads, storage paths and progress bars; they
never parse YAML and hold no science of their own.
"""
