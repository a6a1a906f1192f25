"""memfit: a memory-efficient distributed training runtime for PyTorch.

Importing memfit initializes no CUDA context and compiles nothing; the native extension
(memfit._C) is built at install time and loaded on first use of memfit.io.
"""

__version__ = "0.1.0"
