"""The LM head's product with and without DecoderLM.pad_head's aligned rows (issue 17; BENCHMARKS.md, session 9:
the 1B's head took 0.42 ms of each 3.0 ms decode step in cuBLAS's kernel for unaligned rows).

For the vocabularies of InternVL2-1B (151,655 x 896), InternVL3-8B (151,674 x 3,584) and InternVL2-26B (92,553 x
6,144), bf16, at 1, 64 and 128 rows: the head's time as loaded and padded to a multiple of 64 rows (its output
cut back, as `logits` cuts it), and the largest difference between the two (it should be 0: the same dot
products). Usage: python3 lm_head.py   (on the CPU it runs one small case, as a check of this script)
"""

import torch
import torch.nn.functional as F
from device_timing import seconds_per_call  # this folder's

from batchvl.tools.shapes import SHAPES as ALL

SHAPES = {name: (ALL[name][1]["vocab_size"], ALL[name][1]["hidden_size"])
          for name in ("internvl2-1b", "internvl3-8b", "internvl2-26b")}  # (vocab, hidden)


def main():
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shapes = SHAPES if cuda else {"small": (1001, 64)}
    print(f"the LM head on {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, {dtype}")
    print("| shape | rows | as loaded ms | padded ms | speed-up | max abs. difference |\n|---|---|---|---|---|---|")
    for name, (vocab, hidden) in shapes.items():
        weight = torch.randn(vocab, hidden, device=device, dtype=dtype) * 0.02
        padded = torch.cat([weight, weight.new_zeros(-vocab % 64, hidden)])
        for rows in (1, 64, 128):
            h = torch.randn(rows, hidden, device=device, dtype=dtype)
            def as_loaded(h=h, weight=weight):
                return F.linear(h, weight).float()

            def aligned(h=h, padded=padded, vocab=vocab):
                return F.linear(h, padded)[:, :vocab].float()

            diff = (as_loaded() - aligned()).abs().max().item()
            a, b = seconds_per_call(as_loaded, 50), seconds_per_call(aligned, 50)
            print(f"| {name} | {rows} | {a * 1e3:.3f} | {b * 1e3:.3f} | {a / b:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
