"""Quantization: reference math (``qmath``) and schemes (``Int8Static``, ``WeightOnly``...)."""

from tvmq.quantization import qmath
from tvmq.quantization.schemes import (
    Int8Dynamic,
    Int8Static,
    Scheme,
    WeightOnly,
    get_scheme,
    list_schemes,
)

__all__ = [
    "Int8Dynamic",
    "Int8Static",
    "Scheme",
    "WeightOnly",
    "get_scheme",
    "list_schemes",
    "qmath",
]
