"""The one place an engine is built from a job's `engine:` section: for `run`, the engine workers, Ray and
`pipeline()` alike."""

from __future__ import annotations

from typing import Any

from batchvl.config import EngineSpec
from batchvl.engine.base import Engine, GenerationParams
from batchvl.engine.hf import TransformersEngine
from batchvl.engine.native import NativeEngine
from batchvl.errors import JobError
from batchvl.models.checkpoint import CheckpointInfo


def make_engine(spec: EngineSpec, checkpoint: CheckpointInfo, tokenizer: Any, params: GenerationParams) -> Engine:
    """The engine `spec.backend` names, loaded on `spec.device`. Each backend gets exactly the settings it
    takes, by name: a setting this code passes and a backend lacks is a TypeError here, not a silent no-op."""
    if spec.backend == "native":
        return NativeEngine(checkpoint, tokenizer, params, device=spec.device, dtype=spec.dtype,
                            max_batch_size=spec.max_batch_size, max_batch_tokens=spec.max_batch_tokens,
                            decode_attention=spec.decode_attention, compile=spec.compile)
    if spec.backend == "transformers":
        return TransformersEngine(checkpoint, tokenizer, params, device=spec.device, dtype=spec.dtype,
                                  max_batch_size=spec.max_batch_size, trust_remote_code=spec.trust_remote_code)
    raise JobError(f"engine.backend: unknown backend {spec.backend!r}")
