"""The toy hierarchy of seed 004 (``c -> z2 -> z1 -> x`` in 2-D), its true density,
Gaussian and discrete model/guide pairs for it, and the post's figures."""

from .data import ToyData, ToyHierarchy, ToySample, pack, unpack
from .pairs import DiscreteToyPair, GaussianToyPair

__all__ = [
    "DiscreteToyPair",
    "GaussianToyPair",
    "ToyData",
    "ToyHierarchy",
    "ToySample",
    "pack",
    "unpack",
]
