"""batchvl's two stages as Ray Data callable classes, for a user's own pipeline (and `batchvl run --ray`).

    ds = ds.map_batches(batchvl.ray.Prepare, fn_constructor_kwargs={"job": job}, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=8))      # CPU: media and prompts
    ds = ds.map_batches(batchvl.ray.Engine, fn_constructor_kwargs={"job": job}, batch_format="pyarrow",
                        batch_size=job.engine.max_batch_size, num_gpus=1,                # GPU
                        compute=ray.data.ActorPoolStrategy(size=4))
    # ds now has the columns (and types) of a local run's output, one row per input row

README.md ("In your own Ray pipeline") has the whole example, which tests/test_ray.py runs, and what it needs:
num_gpus=1 where the cluster has no GPU waits forever; the checkpoint is read on every node, at the same path;
duplicate ids are not looked for (two rows).

They live in the run layer (`batchvl.run.ray_stages`, beside the `--ray` runner that uses them); this module is
their public name. It imports without Ray; `require_ray` gives the install hint where Ray is needed.
"""

from batchvl.run.ray_stages import INSTALL_HINT, PREPARED_SCHEMA, Engine, Prepare, load_job_like, require_ray

__all__ = ["Engine", "INSTALL_HINT", "PREPARED_SCHEMA", "Prepare", "load_job_like", "require_ray"]
