"""Times kernels/attention.py forward + backward beside PyTorch's SDPA on the same GPU
(bench/gpu_check.sh runs it; a GPU and PyTorch with Triton are needed).

    python -m kernels.bench_attention [--batch 32] [--heads 16] [--tokens 256 1024] [--dim 64]

Shapes are MicroDiT_XL_2's self-attention at 256 px: 1024 patches, or 256 kept under 75%
masking; bf16. Prints one line per shape: milliseconds per forward + backward of each, and
the ratio (ours / SDPA).
"""
import argparse

import torch
import torch.nn.functional as F

from kernels import attention as ours


def median_ms(step, warmup=3, iters=10):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--dim", type=int, default=64)
    a = p.parse_args()
    for n in a.tokens:
        shape = (a.batch, a.heads, n, a.dim)
        q, k, v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))

        def triton_step():
            o, lse = ours.attention(q, k, v)
            ours.attention_backward(q, k, v, o, lse, do)

        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))

        def sdpa_step():
            F.scaled_dot_product_attention(qs, ks, vs).backward(do)

        t_ours, t_sdpa = median_ms(triton_step), median_ms(sdpa_step)
        print(f"attention fwd+bwd bf16 {list(shape)}: ours {t_ours:.3f} ms, SDPA {t_sdpa:.3f} ms, "
              f"ratio {t_ours / t_sdpa:.2f}")


if __name__ == "__main__":
    main()
