"""Continual learners, one file each, found by name through `carecl.registry.METHODS`.

`methods/base.py` holds the interface and the checklist for adding a method; `build_method` makes one.
"""
