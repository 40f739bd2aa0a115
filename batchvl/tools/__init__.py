"""The tools around the product, not the product: benchmarks (`bench`, `bench_media`, `bench_kernels`), the
parity check against transformers, the real model shapes, and tiny random checkpoints for tests and the demo."""
