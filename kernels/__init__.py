"""batchvl's Triton kernels, one per file, each with a typed wrapper that checks its inputs.

Imported as `batchvl.kernels` (see batchvl/kernels.py for why not as `kernels`). The kernels need triton; the
engine imports them only on CUDA and falls back to PyTorch when triton is missing. Without triton this package
still imports, so that the torch references beside the kernels do (the engine's fallback, e.g.
`batchvl.kernels.fp8_quant.quantize_fp8_per_token_reference`), and importing a kernel raises an ImportError that
names triton. Tests run the kernels on the CPU under TRITON_INTERPRET=1.
"""

__all__ = ["bi_layernorm", "bi_matmul", "bi_rmsnorm", "decode_attention", "quantize_fp8_per_token",
           "rmsnorm_quantize_fp8"]

try:
    import triton  # noqa: F401
except ImportError as e:
    _NO_TRITON = e

    def __getattr__(name: str):
        if name in __all__:  # an ImportError, not an AttributeError: `from batchvl.kernels import x` raises it
            raise ImportError(f"batchvl.kernels.{name} needs triton ({_NO_TRITON})") from _NO_TRITON
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
else:
    from batchvl.kernels.bi_layernorm import bi_layernorm
    from batchvl.kernels.bi_matmul import bi_matmul
    from batchvl.kernels.bi_rmsnorm import bi_rmsnorm
    from batchvl.kernels.decode_attention import decode_attention
    from batchvl.kernels.fp8_quant import quantize_fp8_per_token
    from batchvl.kernels.rmsnorm_fp8_quant import rmsnorm_quantize_fp8
