"""Shared by the method tests: the learning runs live in ``tests/learning.py`` (fixture ``learned``)."""
