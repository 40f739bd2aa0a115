"""batchvl: offline batch inference of InternVL vision-language models over large datasets.

LMDeploy's Python API is here too (`from batchvl import pipeline, GenerationConfig`); it is imported on
first use, so `import batchvl` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = ("BackendConfig", "GenerationConfig", "Pipeline", "Response", "Session", "pipeline")
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        from batchvl import api

        return getattr(api, name)
    raise AttributeError(f"module 'batchvl' has no attribute {name!r}")
