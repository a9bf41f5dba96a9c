"""Hand-scheduled TIR kernels that tvmq's passes substitute for slow default lowerings."""

from .x86_int8 import KERNEL_ATTR, DenseTiles, choose_tiles, int8_dense_vnni, pack_weight_vnni

__all__ = ["KERNEL_ATTR", "DenseTiles", "choose_tiles", "int8_dense_vnni", "pack_weight_vnni"]
