"""The one place an engine is built from a job's `engine:` section: for `run`, the engine workers, Ray and
`pipeline()` alike."""

from __future__ import annotations

import os
from typing import Any

import torch

from batchvl.config import EngineSpec
from batchvl.engine.base import Engine, GenerationParams
from batchvl.engine.hf import TransformersEngine
from batchvl.engine.native import NativeEngine
from batchvl.errors import JobError
from batchvl.models.checkpoint import CheckpointInfo
from batchvl.models.compressed import dense_refused

FP8_CAPABILITY = (8, 9)  # Ada; Hopper is 9.0. torch._scaled_mm's fp8 kernels and vLLM's fp8 schemes start there


def make_engine(spec: EngineSpec, checkpoint: CheckpointInfo, tokenizer: Any, params: GenerationParams) -> Engine:
    """The engine `spec.backend` names, loaded on `spec.device`. Each backend gets exactly the settings it
    takes, by name: a setting this code passes and a backend lacks is a TypeError here, not a silent no-op."""
    check_quantization(spec, checkpoint)
    check_deterministic(spec)
    if spec.backend == "native":
        return NativeEngine(checkpoint, tokenizer, params, device=spec.device, dtype=spec.dtype,
                            max_batch_size=spec.max_batch_size, max_batch_tokens=spec.max_batch_tokens,
                            decode_attention=spec.decode_attention, compile=spec.compile,
                            quantization=spec.quantization, quantize_vision=spec.quantize_vision,
                            load_format=spec.load_format, refill=spec.refill, refill_at=spec.refill_at,
                            fused_vision_gelu=spec.fused_vision_gelu, deterministic=spec.deterministic,
                            step_graph=spec.step_graph)
    if spec.backend == "transformers":
        return TransformersEngine(checkpoint, tokenizer, params, device=spec.device, dtype=spec.dtype,
                                  max_batch_size=spec.max_batch_size, trust_remote_code=spec.trust_remote_code,
                                  load_format=spec.load_format)
    raise JobError(f"engine.backend: unknown backend {spec.backend!r}")


def check_deterministic(spec: EngineSpec) -> None:
    """`engine.deterministic` against the device: its Triton kernels need a CUDA GPU (on the CPU they run only in
    Triton's interpreter, which the tests set with TRITON_INTERPRET=1). Raises JobError naming the setting."""
    if not spec.deterministic or spec.backend != "native" or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if spec.device == "cpu" or (spec.device == "auto" and not torch.cuda.is_available()):
        raise JobError("engine.deterministic: needs a CUDA GPU (its batch-invariant Triton kernels); this run is on "
                       "the CPU")


def check_quantization(spec: EngineSpec, checkpoint: CheckpointInfo) -> None:
    """`engine.quantization` against the checkpoint and the device, at plan time (`batchvl validate`) and again
    where the engine is built. (The job alone is checked in batchvl.config.checks: fp8 needs the native
    backend.) Raises JobError naming the setting:
    - a checkpoint already in fp8 runs natively only with fp8 (it is not dequantized), and a quantization the
      native engine does not load is refused (`model: ...`);
    - fp8 needs a CUDA GPU of compute capability 8.9 or newer: not the CPU, not an Ampere or older GPU.
    The transformers backend reads a checkpoint's quantization_config itself, so it is not looked at here."""
    if spec.backend != "native":
        return
    if checkpoint.quantization is not None and spec.quantization != "fp8":
        raise dense_refused(checkpoint.path)
    if spec.quantization != "fp8":
        return
    if spec.device == "cpu" or (spec.device == "auto" and not torch.cuda.is_available()):
        raise JobError("engine.quantization: fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, "
                       "Hopper, Blackwell); this run is on the CPU")
    if not torch.cuda.is_available():  # device cuda, planned where there is none (a Ray head node): each engine
        return  # checks its own GPU when it is built, and a local engine refuses the missing device
    visible = torch.cuda.device_count()
    for gpu in [g for g in spec.devices if g < visible]:  # a worker process sees only its own GPU, as GPU 0
        capability = torch.cuda.get_device_capability(gpu)
        if capability < FP8_CAPABILITY:
            raise JobError(f"engine.quantization: fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper, "
                           f"Blackwell); GPU {gpu} ({torch.cuda.get_device_name(gpu)}) is "
                           f"{capability[0]}.{capability[1]}")
