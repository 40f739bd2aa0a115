"""Engines turn batches of requests into results. `make_engine` picks the one the job names."""

from batchvl.engine.base import Engine, GenerationParams, make_engine

__all__ = ["Engine", "GenerationParams", "make_engine"]
