"""Readers for the on-disk formats of the supported datasets (reports, NIfTI, ...).

Each module here is a set of pure functions over one file format; datamodules combine them.
"""
