"""nsa_codegen: Native Sparse Attention as generated Triton kernels, with a drop-in module.

Importing the package is light: it loads PyTorch and the pure-PyTorch reference only; Triton and the
generated kernels are imported on first CUDA use (`nsa_codegen.kernels.selected`).
"""
from .module import DecodeCache, SparseAttention
from .model import Transformer

__all__ = ["SparseAttention", "DecodeCache", "Transformer"]
__version__ = "0.1.0"
