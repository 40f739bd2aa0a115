"""Engines turn batches of requests into results. `batchvl.engine.factory.make_engine` builds the one a job
names; `base.Engine` is the contract both backends keep."""

from batchvl.engine.base import Engine, GenerationParams

__all__ = ["Engine", "GenerationParams"]
