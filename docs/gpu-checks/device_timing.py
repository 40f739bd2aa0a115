"""The GPU scripts' one timer: a call's mean wall time, the device synchronised around the timed calls."""
import time

import torch


def seconds_per_call(fn, repeats: int = 20) -> float:
    """`fn()`'s mean time over `repeats` calls, after one untimed call (its first-call costs: kernel loading,
    heuristics, compilation)."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats
