"""batchvl's Triton kernels, as `batchvl.kernels`: the modules of the top-level `kernels/` folder.

The kernels live in `kernels/`, one per file, as the project's layout has it. They cannot be installed as a
top-level package named `kernels`: that is the name of Hugging Face's kernel-hub package, which transformers
probes for and would then import. So they are a subpackage of batchvl:
- installed from a wheel, setuptools puts `kernels/` at `batchvl/kernels/` (pyproject.toml's `package-dir`),
  and that package is found before this module;
- in a source tree (an editable install, or `PYTHONPATH=.`), this module stands in for that package: its
  `__path__` is the `kernels/` folder, so `batchvl.kernels.decode_attention` is `kernels/decode_attention.py`.
Its body is the package's own: `kernels/__init__.py` is run here, so the two cannot drift apart.
"""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parent.parent / "kernels")]

_INIT = Path(__path__[0]) / "__init__.py"
exec(compile(_INIT.read_text(encoding="utf-8"), str(_INIT), "exec"))  # noqa: S102 - the package's own file
