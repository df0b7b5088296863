"""The work of `microdit bench`, in PyTorch, for side-by-side timing on one machine.

A compact re-implementation of the MicroDiT architecture (same widths, same expert-choice
routing, same EDM loss and Heun step) written for this benchmark; parity with the reference
itself is established by the fixture tests, not here.

    python3 bench/pytorch_bench.py --preset MicroDiT_Tiny_2 --batch 4 --iters 3
    python3 bench/pytorch_bench.py --config runs/demo/dit.json --batch 32   # a config file
"""
import argparse, json, math, statistics, time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def round_up(x, m):
    return m * ((x + m - 1) // m)


PRESETS = {
    "MicroDiT_Tiny_2": dict(dim=512, depth=16, head_dim=32, mixer_depth=4, mixer_dim=512),
    "MicroDiT_XL_2": dict(dim=1024, depth=28, head_dim=64, mixer_depth=6, mixer_dim=768),
}


def from_config(path):
    """The reference DiT constructor's arguments (as `microdit bench --config` reads them)
    mapped onto this implementation's; absent ones take the reference's defaults."""
    c = json.load(open(path))
    depth = c.get("depth", 28)
    mixer_dim = c.get("patch_mixer_dim", 512)
    return dict(
        dim=c.get("dim", 1152), depth=depth, head_dim=c.get("head_dim", 64),
        mixer_depth=c.get("patch_mixer_depth", 4), mixer_dim=mixer_dim,
        C=c.get("in_channels", 4), size=c.get("input_size", 32), p=c.get("patch_size", 2),
        cc=c.get("caption_channels", 1024), mult=c.get("multiple_of", 256),
        experts=c.get("num_experts", 8), capacity=c.get("expert_capacity", 2.0),
        mixer_qkv=int(c.get("patch_mixer_qkv_ratio", 1.0) * mixer_dim),
        mixer_hidden=int(c.get("patch_mixer_mlp_ratio", 4.0) * mixer_dim),
        qkv_multipliers=c.get("qkv_multipliers", list(np.linspace(0.5, 1.0, depth))),
        ffn_multipliers=c.get("ffn_multipliers", list(np.linspace(0.5, 4.0, depth))),
    )


def ln(d):
    return nn.LayerNorm(d, eps=1e-6, bias=False)


def qk_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def attend(q, k, v, heads):
    b, n, h = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, h // heads).transpose(1, 2)
    o = F.scaled_dot_product_attention(split(qk_norm(q)), split(qk_norm(k)), split(v))
    return o.transpose(1, 2).reshape(b, n, h)


class SelfAttn(nn.Module):
    def __init__(s, d, q, hd):
        super().__init__(); s.qkv = nn.Linear(d, 3 * q, bias=False); s.proj = nn.Linear(q, d, bias=False); s.h = q // hd
    def forward(s, x):
        q, k, v = s.qkv(x).chunk(3, -1); return s.proj(attend(q, k, v, s.h))


class CrossAttn(nn.Module):
    def __init__(s, d, hd):
        super().__init__(); s.q = nn.Linear(d, d, bias=False); s.kv = nn.Linear(d, 2 * d, bias=False); s.proj = nn.Linear(d, d, bias=False); s.h = d // hd
    def forward(s, x, y):
        k, v = s.kv(y).chunk(2, -1); return s.proj(attend(s.q(x), k, v, s.h))


class SwiGLU(nn.Module):
    def __init__(s, d, hidden, mult):
        super().__init__(); f = round_up(2 * hidden // 3, mult)
        s.w1 = nn.Linear(d, f, bias=False); s.w2 = nn.Linear(d, f, bias=False); s.w3 = nn.Linear(f, d, bias=False)
    def forward(s, x):
        return s.w3(F.silu(s.w1(x)) * s.w2(x))


class ExpertChoice(nn.Module):
    def __init__(s, d, hidden, mult, e, cap):
        super().__init__(); f = round_up(hidden, mult); s.e, s.cap = e, cap
        s.w1 = nn.Parameter(torch.randn(e, d, f) * 0.02); s.w2 = nn.Parameter(torch.randn(e, f, d) * 0.02); s.gate = nn.Linear(d, e, bias=False)
    def forward(s, x):
        n, t, d = x.shape; k = int(s.cap * t / s.e)
        probs = F.softmax(s.gate(x), -1).transpose(1, 2)
        g, idx = torch.topk(probs, k, -1)
        index = idx.reshape(n, s.e * k, 1).expand(n, s.e * k, d)
        xin = x.gather(1, index).reshape(n, s.e, k, d).transpose(0, 1).reshape(s.e, n * k, d)
        h = torch.bmm(F.gelu(torch.bmm(xin, s.w1)), s.w2).reshape(s.e, n, k, d).transpose(0, 1) * g.unsqueeze(-1)
        return torch.zeros_like(x).scatter_add(1, index, h.reshape(n, s.e * k, d))


class Block(nn.Module):
    def __init__(s, d, hd, q, hidden, mult, moe, cond, experts=8, capacity=2.0):
        super().__init__()
        s.n1, s.n2, s.n3 = ln(d), ln(d), ln(d); s.attn = SelfAttn(d, q, hd); s.cross = CrossAttn(d, hd)
        s.mlp = ExpertChoice(d, hidden, mult, experts, capacity) if moe else SwiGLU(d, hidden, mult)
        s.ada = nn.Linear(cond, 6 * d)
    def forward(s, x, y, c):
        sh1, sc1, g1, sh2, sc2, g2 = s.ada(F.gelu(c, approximate="tanh")).unsqueeze(1).chunk(6, -1)
        x = x + g1 * s.attn(s.n1(x) * (1 + sc1) + sh1)
        x = x + s.cross(s.n2(x), y)
        return x + g2 * s.mlp(s.n3(x) * (1 + sc2) + sh2)


class Mlp(nn.Module):
    def __init__(s, i, d):
        super().__init__(); s.fc1 = nn.Linear(i, d); s.norm = ln(d); s.fc2 = nn.Linear(d, d)
    def forward(s, x):
        return s.fc2(s.norm(F.gelu(s.fc1(x), approximate="tanh")))


class MicroDiT(nn.Module):
    def __init__(s, dim, depth, head_dim, mixer_depth, mixer_dim, C=4, size=32, p=2, cc=1024, mult=256,
                 experts=8, capacity=2.0, mixer_qkv=None, mixer_hidden=None, qkv_multipliers=None, ffn_multipliers=None):
        super().__init__()
        s.p, s.C = p, C; T = (size // p) ** 2
        s.x_emb = nn.Conv2d(C, dim, p, p)
        s.register_buffer("pos", torch.randn(1, T, dim) * 0.1)
        s.t1 = nn.Linear(512, dim); s.t2 = nn.Linear(dim, dim)
        s.y_proj = Mlp(cc, dim)
        s.cn1, s.cn2 = ln(dim), ln(dim); s.cattn = SelfAttn(dim, dim, head_dim); s.cmlp = SwiGLU(dim, 4 * dim, mult)
        s.pooled = Mlp(dim, dim)
        moe = dict(experts=experts, capacity=capacity)
        mq, mh = mixer_qkv or mixer_dim, mixer_hidden or 4 * mixer_dim
        s.mixer = nn.ModuleList([Block(mixer_dim, head_dim, mq, mh, mult, i >= 1 and (i + 1) % 2 == 0, dim, **moe) for i in range(mixer_depth)])
        proj = lambda a, b: nn.Sequential(ln(a), nn.Linear(a, b, bias=False)) if mixer_dim != dim else nn.Identity()
        s.xin, s.xout, s.ymap = proj(dim, mixer_dim), proj(mixer_dim, dim), proj(dim, mixer_dim)
        qr = qkv_multipliers if qkv_multipliers is not None else np.linspace(0.5, 1.0, depth)
        fr = ffn_multipliers if ffn_multipliers is not None else np.linspace(0.5, 4.0, depth)
        qkv = lambda r: dim if r == 1 else round_up(int(dim * r), 2 * head_dim)
        s.blocks = nn.ModuleList([Block(dim, head_dim, qkv(qr[i]), int(dim * fr[i]), mult, i < depth - 1 and (i + 1) % 2 == 0, dim, **moe) for i in range(depth)])
        s.fn = ln(dim); s.fada = nn.Linear(dim, 2 * dim); s.flin = nn.Linear(dim, p * p * C)

    def forward(s, x, t, y, ids_keep=None, ids_restore=None):
        b = x.shape[0]
        x = s.x_emb(x).flatten(2).transpose(1, 2) + s.pos
        half = 256; freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        a = t.expand(b)[:, None] * freqs[None]
        c = s.t2(F.gelu(s.t1(torch.cat([a.cos(), a.sin()], -1)), approximate="tanh"))
        y = s.y_proj(y); y = y + s.cattn(s.cn1(y)); y = y + s.cmlp(s.cn2(y))
        c = c + s.pooled(y.mean(1))
        x = s.xin(x); ym = s.ymap(y)
        for blk in s.mixer:
            x = blk(x, ym, c)
        if ids_keep is not None:
            x = x.gather(1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        x = s.xout(x)
        for blk in s.blocks:
            x = blk(x, y, c)
        sh, sc = s.fada(F.gelu(c, approximate="tanh")).unsqueeze(1).chunk(2, -1)
        x = s.flin(s.fn(x) * (1 + sc) + sh)
        if ids_keep is not None:
            T = ids_restore.shape[1]
            x = torch.cat([x, x.new_zeros(b, T - x.shape[1], x.shape[2])], 1).gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
        g = int(x.shape[1] ** 0.5)
        return torch.einsum("nhwpqc->nchpwq", x.reshape(b, g, g, s.p, s.p, s.C)).reshape(b, s.C, g * s.p, g * s.p)


def denoise(m, x, sigma, y, sd=0.9, mask=None, cfg=1.0):
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip = sd ** 2 / (s ** 2 + sd ** 2); c_out = s * sd / (s ** 2 + sd ** 2).sqrt(); c_in = 1 / (sd ** 2 + s ** 2).sqrt()
    if cfg > 1:
        f = m(torch.cat([c_in * x] * 2), (sigma.log() / 4).flatten(), torch.cat([y, torch.zeros_like(y)]))
        cond, unc = f.chunk(2); f = unc + cfg * (cond - unc)
    else:
        f = m(c_in * x, (sigma.log() / 4).flatten(), y, *(mask or ()))
    return c_skip * x + c_out * f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="MicroDiT_Tiny_2"); ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--config", help="a reference DiT constructor JSON instead of a preset")
    ap.add_argument("--caption-len", type=int, default=77); ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--mask-ratios", default="0.75,0"); ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--device", default="cpu"); ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--sampler-only", action="store_true"); ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"], help="bf16: torch.autocast, as the reference's amp_bf16")
    a = ap.parse_args()
    dev = torch.device(a.device); torch.manual_seed(0)
    # PyTorch's defaults: f32 products in true f32 (no TF32); bf16 through autocast.
    autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16")
    arch = from_config(a.config) if a.config else dict(PRESETS[a.preset], size=a.resolution // 8)
    side, C, p = arch["size"], arch.get("C", 4), arch.get("p", 2); T = (side // p) ** 2
    m = MicroDiT(**arch).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=2.4e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    b = a.batch; x0 = torch.randn(b, C, side, side, device=dev); y = torch.randn(b, a.caption_len, arch.get("cc", 1024), device=dev)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    print(f"{sum(p.numel() for p in m.parameters())} parameters, batch {b}, torch {torch.__version__}, {torch.get_num_threads()} threads, {a.dtype}, {a.device}")

    def timed(f):
        for _ in range(a.warmup): f()
        ts = []
        for _ in range(a.iters):
            t0 = time.perf_counter(); f(); sync(); ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    for ratio in [] if a.sampler_only else [float(r) for r in a.mask_ratios.split(",")]:
        def step():
            sigma = (torch.randn(b, device=dev) * 1.2 - 0.6).exp(); s = sigma.reshape(-1, 1, 1, 1)
            w = (s ** 2 + 0.81) / (s * 0.9) ** 2
            mask = None
            if ratio > 0:
                keep = int(T * (1 - ratio)); shuffle = torch.rand(b, T, device=dev).argsort(1)
                mask = (shuffle[:, :keep], shuffle.argsort(1))
            with autocast():
                d = denoise(m, x0 + torch.randn_like(x0) * s, sigma, y, mask=mask)
            loss = w * (d.float() - x0) ** 2
            if mask is not None:
                per = F.avg_pool2d(loss.mean(1), p).flatten(1); vis = torch.ones(b, T, device=dev); vis.scatter_(1, mask[0], 0); vis = 1 - vis
                loss = (per * vis).sum(1) / vis.sum(1)
            loss.mean().backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 0.25); opt.step(); opt.zero_grad(set_to_none=True)
        t = timed(step); print(f"{'train step, mask ratio ' + str(ratio):<40} {t:>9.3f} s   {b / t:>8.2f} images/s")

    sig = [(80 ** (1 / 7) + i / 29 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(2)]
    x = x0 * sig[0]
    @torch.no_grad()
    @autocast()
    def heun():
        t0, t1 = torch.tensor([sig[0]], device=dev), torch.tensor([sig[1]], device=dev)
        d = (x - denoise(m, x, t0, y, cfg=a.guidance)) / sig[0]; xn = x + (sig[1] - sig[0]) * d
        d2 = (xn - denoise(m, xn, t1, y, cfg=a.guidance)) / sig[1]; return x + (sig[1] - sig[0]) * 0.5 * (d + d2)
    t = timed(heun); print(f"{'Heun step, guidance ' + str(a.guidance):<40} {t:>9.3f} s   {b / t:>8.2f} images/s")


if __name__ == "__main__":
    main()
