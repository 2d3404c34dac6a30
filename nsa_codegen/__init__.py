"""nsa_codegen: Native Sparse Attention as generated Triton kernels, with a drop-in module.

Importing the package registers every family's `torch.library` ops (`torch.ops.nsa.*`); the generated
kernels themselves are loaded on first use (`nsa_codegen.codegen.cache`).
"""
from .kernels import FAMILIES as _FAMILIES
from .model import Transformer
from .module import DecodeCache, SparseAttention, StaticCache

for _family in _FAMILIES.values():
    _family.module()  # defines and registers the family's ops

__all__ = ["SparseAttention", "StaticCache", "DecodeCache", "Transformer"]
__version__ = "0.1.0"
