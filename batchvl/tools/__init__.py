"""The tools around the product, not the product: benchmarks (`bench`, `bench_media`, `bench_kernels`), the
parity check against transformers, the real model shapes, tiny random checkpoints for tests and the demo, and
`ray_cluster_check` (batchvl on a real two-node Ray cluster started on this machine)."""
