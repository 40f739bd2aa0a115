"""Why did refill on `mixed` wait 25 s for media (session 10, call 2) where static batches waited 0.2 s?

The hypothesis: page-locked allocations. The preparation threads put each row's tiles in page-locked memory
(PyTorch's caching host allocator). A refill call holds up to four batches' rows until it returns, so the cache
keeps growing through the timed rows, and each new block is a cudaHostAlloc, which the CUDA programming guide
lists among the operations that serialise the device's streams.

1. `alloc`: the time of one new page-locked block (sizes the cache cannot have yet) with the device idle and with
   about a second of matrix products queued, from this thread and from a second one.
2. `bench ARGS...`: `batchvl bench ARGS` with one change: a side whose name holds `nopin` prepares its tiles in
   ordinary memory (the engine then stages each batch's tiles through its own reused page-locked buffer).
Usage: python3 pinned_probe.py alloc | python3 pinned_probe.py bench --shape ... --variant nopin:...
"""
import dataclasses
import sys
import threading
import time

import torch


def alloc() -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()

    def one(mb: int) -> float:
        t = time.perf_counter()
        torch.empty(mb << 20, dtype=torch.uint8, pin_memory=True)
        return time.perf_counter() - t

    print("| when | block MB | seconds | the queued work's rest after it, s |\n|---|---|---|---|")
    for mb in (3, 5, 9):
        print(f"| device idle | {mb} | {one(mb):.4f} | |")
    for mb, where in ((17, "this thread"), (33, "another thread"), (65, "another thread")):
        for _ in range(600):  # about a second of products
            a @ a
        if where == "this thread":
            took = one(mb)
        else:
            box = []
            worker = threading.Thread(target=lambda mb=mb, box=box: box.append(one(mb)))
            worker.start()
            worker.join()
            took = box[0]
        t = time.perf_counter()
        torch.cuda.synchronize()
        print(f"| a second of products queued, from {where} | {mb} | {took:.4f} | {time.perf_counter() - t:.3f} |")


def bench(args: list[str]) -> None:
    import batchvl.run.local as local
    from batchvl.cli import main

    made = local.make_preparer

    def make_preparer(job, plan):
        preparer = made(job, plan)
        if "nopin" in str(job.output.path):
            preparer.s = dataclasses.replace(preparer.s, pin_memory=False)
        return preparer

    local.make_preparer = make_preparer
    main(["bench", *args])


if __name__ == "__main__":
    alloc() if sys.argv[1] == "alloc" else bench(sys.argv[2:])
