"""batchvl's Triton kernels, as `batchvl.kernels`: the modules of the top-level `kernels/` folder.

The kernels live in `kernels/`, one per file, as the project's layout has it. They cannot be installed as a
top-level package named `kernels`: that is the name of Hugging Face's kernel-hub package, which transformers
probes for and would then import. So they are a subpackage of batchvl:
- installed from a wheel, setuptools puts `kernels/` at `batchvl/kernels/` (pyproject.toml's `package-dir`),
  and that package is found before this module;
- in a source tree (an editable install, or `PYTHONPATH=.`), this module stands in for that package: its
  `__path__` is the `kernels/` folder, so `batchvl.kernels.decode_attention` is `kernels/decode_attention.py`.
The kernels need triton; without it this package still imports, so that the torch references beside them do
(see kernels/__init__.py, whose body this module repeats).
"""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parent.parent / "kernels")]

__all__ = ["decode_attention", "quantize_fp8_per_token", "rmsnorm_quantize_fp8"]

try:
    import triton  # noqa: F401
except ImportError as e:
    _NO_TRITON = e

    def __getattr__(name: str):
        if name in __all__:  # an ImportError, not an AttributeError: `from batchvl.kernels import x` raises it
            raise ImportError(f"batchvl.kernels.{name} needs triton ({_NO_TRITON})") from _NO_TRITON
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
else:
    from batchvl.kernels.decode_attention import decode_attention  # noqa: E402 - needs the __path__ above
    from batchvl.kernels.fp8_quant import quantize_fp8_per_token  # noqa: E402
    from batchvl.kernels.rmsnorm_fp8_quant import rmsnorm_quantize_fp8  # noqa: E402
