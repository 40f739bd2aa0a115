"""The run layer: plans a job, drives rows through the stages (prepare -> engine -> writer) and keeps the
output folder exactly-once; in this process (`local`), over a host's GPUs (`gpus`, `worker`) or on Ray
(`ray_runner`, `ray_stages`)."""
