"""The products and attention of `examples/gpu_kernels.rs` (PROBE=speed), in PyTorch on CUDA.

    python3 bench/pytorch_kernels.py

f32 products in true f32 (PyTorch's default `allow_tf32 = False`), bf16 with f32 accumulation.
"""
import time, torch, torch.nn.functional as F
torch.backends.cuda.matmul.allow_tf32 = False
dev = "cuda"
shapes = [(1, 2048, 1024, 3072, False), (1, 8192, 768, 2304, False), (1, 8192, 1024, 4096, False),
          (1, 1024, 8192, 3072, True), (8, 512, 1024, 4096, False), (1, 8192, 4096, 1024, False)]
def bench(f, n=20):
    f(); torch.cuda.synchronize()
    for _ in range(3): f()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): f()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n
for dt in [torch.bfloat16, torch.float32]:
    for b, m, k, n, t in shapes:
        a = torch.randn(b, k, m, device=dev, dtype=dt).transpose(1, 2) if t else torch.randn(b, m, k, device=dev, dtype=dt)
        w = torch.randn(b, k, n, device=dev, dtype=dt)
        per = bench(lambda: torch.matmul(a, w))
        print(f"torch matmul {dt} b{b} {m}x{k}x{n}{' (lhsT)' if t else ''} {per*1e3:.3f} ms {2*b*m*k*n/per/1e12:.1f} TFLOP/s")
for n, dt in [(256, torch.bfloat16), (1024, torch.bfloat16), (256, torch.float32)]:
    q = torch.randn(32, 16, n, 64, device=dev, dtype=dt)
    per = bench(lambda: F.scaled_dot_product_attention(q, q, q), 10)
    print(f"torch sdpa {dt} [32,16,{n},64] {per*1e3:.3f} ms")
