"""GPU benchmark of the Triton W{2,3,4,8}A16 kernels (kernels/triton_wq.py).

NOT RUN YET: it was written in a session without a GPU (the Triton kernels were only checked for
correctness on CPU under TRITON_INTERPRET=1); its first run on a CUDA machine is also the kernels'
first compile and autotune there. Numbers in reports/ come only from runs of this script.

For the Llama-3-8B shapes K x N (in x out) = 4096x4096, 4096x14336 and 14336x4096, at batch
(rows) 1, 4 and 16, and for 2, 3, 4 and 8 bits (asymmetric, group 128, fp16 scales, bf16
activations), it reports:

- time of `wq_matmul` (median of triton.testing.do_bench) and of a bf16 torch matmul with the
  dense weight, and their ratio;
- effective bandwidth: bytes moved (packed weight + scales/zeros + activations + output) / time,
  against the device's copy bandwidth measured here (a 1 GiB device-to-device copy: read + write);
- the max relative error against the torch reference (checked before timing).

    python bench/kernels_gpu.py [--bits 2,3,4,8] [--batches 1,4,16] [--out reports/kernels_gpu.txt]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))   # (K = in_features, N = out_features)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy, counting read + write."""
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    return 2 * nbytes / (ms * 1e-3)


def random_packed(N: int, K: int, bits: int, group: int = 128):
    from kernels.format import pack

    g = torch.Generator().manual_seed(N + K + bits)
    G = -(-K // group)
    codes = torch.randint(0, 2**bits, (N, K), generator=g)
    scales = (torch.rand(N, G, generator=g) * 0.01 + 1e-3).half()
    zeros = torch.randint(0, 2**bits, (N, G), generator=g)
    return pack(codes, scales, zeros, bits, group).to("cuda")


def run(bits_list: list[int], batches: list[int]) -> str:
    import triton.testing

    from kernels.reference import dequantize
    from kernels.triton_wq import wq_matmul

    bw = copy_bandwidth()
    name = torch.cuda.get_device_name()
    lines = [f"kernels_gpu: {name}, torch {torch.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s (read + write)",
             "activations bf16; weights asymmetric, group 128, fp16 scales, uint8 zeros", "",
             f"{'K x N':>12} {'bits':>4} {'batch':>5} {'wq us':>8} {'bf16 us':>8} {'speed-up':>8} "
             f"{'GB/s':>7} {'% copy':>6} {'max rel err':>11}"]
    for K, N in SHAPES:
        for bits in bits_list:
            pw = random_packed(N, K, bits)
            W = dequantize(pw, torch.bfloat16)            # the dense bf16 weight for the baseline
            for M in batches:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                y, ref = wq_matmul(x, pw), x @ W.t()
                err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
                t_wq = triton.testing.do_bench(lambda x=x, pw=pw: wq_matmul(x, pw), warmup=25, rep=100)
                t_bf = triton.testing.do_bench(lambda x=x, W=W: x @ W.t(), warmup=25, rep=100)
                moved = pw.nbytes + x.numel() * x.element_size() + M * N * 2
                gbs = moved / (t_wq * 1e-3)
                lines.append(f"{f'{K}x{N}':>12} {bits:>4} {M:>5} {t_wq * 1e3:>8.1f} {t_bf * 1e3:>8.1f} "
                             f"{t_bf / t_wq:>8.2f} {gbs / 1e9:>7.0f} {100 * gbs / bw:>6.1f} {err:>11.2e}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernels_gpu: needs a CUDA GPU (the kernels run on CPU only under TRITON_INTERPRET=1, for tests)")
    text = run([int(b) for b in args.bits.split(",")], [int(b) for b in args.batches.split(",")])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
