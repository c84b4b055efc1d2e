"""medvlp: 2D and 3D medical vision-language pre-training behind one interface."""

__version__ = "0.1.0"
