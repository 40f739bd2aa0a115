"""The vision pass's one-call copy of page-locked tiles (VisionRunner._pass, `torch._foreach_copy_`) gives the
device the same pixels, in the same order, as the staging copy of unpinned tiles does. The pass itself is replaced
by one that returns what it is given, so the check sees the copy alone. Rows of 1 to 13 tiles, 40 rows, chunks
of 16. Usage (CUDA): python3 tile_copy_check.py
"""
import torch

from batchvl.engine.vision import VisionRunner


def main() -> None:
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 256, (1 + i % 13, 448, 448, 3), dtype=torch.uint8, generator=g) for i in range(40)]
    def echo(tiles):  # [t, S, S, 3] -> [t, 1, S*S*3]: the "features" are the pixels themselves
        return tiles.reshape(tiles.shape[0], 1, -1)

    runner = VisionRunner(echo, device, chunk=16, cuda_graphs=False)
    pinned = runner._pass([t.pin_memory() for t in rows])
    staged = runner._pass(rows)
    torch.cuda.synchronize()
    want = torch.cat(rows).reshape(sum(t.shape[0] for t in rows), -1).to(device)
    print(f"one-call copy of {len(rows)} pinned rows ({want.shape[0]} tiles): identical to the staging copy "
          f"{torch.equal(pinned, staged)}, to the rows in order {torch.equal(pinned, want)}")


if __name__ == "__main__":
    main()
