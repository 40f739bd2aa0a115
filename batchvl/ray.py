"""batchvl's two stages as Ray Data callable classes, for a user's own pipeline (and `batchvl run --ray`).

    ds = ds.map_batches(batchvl.ray.Prepare, fn_constructor_kwargs={"job": job}, batch_format="pyarrow",
                        concurrency=8)                                   # CPU: media and prompts
    ds = ds.map_batches(batchvl.ray.Engine, fn_constructor_kwargs={"job": job}, batch_format="pyarrow",
                        batch_size=job.engine.max_batch_size, num_gpus=1, concurrency=4)   # GPU
    # ds now has the columns (and types) of a local run's output

They live in the run layer (`batchvl.run.ray_stages`, beside the `--ray` runner that uses them); this module is
their public name. It imports without Ray; `require_ray` gives the install hint where Ray is needed.
"""

from batchvl.run.ray_stages import INSTALL_HINT, PREPARED_SCHEMA, Engine, Prepare, load_job_like, require_ray

__all__ = ["Engine", "INSTALL_HINT", "PREPARED_SCHEMA", "Prepare", "load_job_like", "require_ray"]
