"""batchvl's Triton kernels, one per file, each with a typed wrapper that checks its inputs.

Imported as `batchvl.kernels` (see batchvl/kernels.py for why not as `kernels`). Importing this package needs
triton; the engine imports it only on CUDA and falls back to PyTorch when triton is missing. Tests run the
kernels on the CPU under TRITON_INTERPRET=1.
"""

from batchvl.kernels.decode_attention import decode_attention

__all__ = ["decode_attention"]
