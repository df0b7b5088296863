"""The work of `microdit bench image`, in PyTorch: one whole image (text tower, DPM-Solver++(2M)
over the denoiser with guidance, SDXL VAE decode), random weights, each part timed.

    python3 bench/pytorch_generate.py --preset MicroDiT_XL_2 --resolution 512 [--dtype int8]

`--dtype int8` is what a PyTorch user reaches for: `torch.ao.quantization.quantize_dynamic`
on the denoiser's Linear layers (int8 weights, activations quantised per batch at run time;
the experts' bare weight tensors stay f32). The text tower and the VAE stay f32 on both sides.
"""
import argparse, math, time, warnings

import torch
from open_clip.transformer import TextTransformer, QuickGELU
import open_clip

from pytorch_bench import MicroDiT, PRESETS, denoise
from pytorch_frozen import sdxl_vae


def karras(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    ramp = [i / (n - 1) for i in range(n)]
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + r * (lo - hi)) ** rho for r in ramp] + [0.0]


@torch.no_grad()
def dpmpp_2m(m, x, y, sigmas, guidance):
    """k-diffusion's `sample_dpmpp_2m`."""
    old = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = raw = denoise(m, x, torch.tensor([s]), y, cfg=guidance)
        if s_next == 0:
            return denoised
        h = math.log(s) - math.log(s_next)
        if old is not None:
            r = (math.log(sigmas[i - 1]) - math.log(s)) / h
            denoised = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        x = (s_next / s) * x - math.expm1(-h) * denoised
        old = raw
    return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="MicroDiT_XL_2"); ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20); ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--dtype", default="f32", choices=["f32", "int8"])
    a = ap.parse_args()
    warnings.filterwarnings("ignore")  # quantize_dynamic's deprecation notices
    torch.manual_seed(0)
    tower = TextTransformer(context_length=77, vocab_size=49408, width=1024, heads=16, layers=24, act_layer=QuickGELU).eval()
    dit = MicroDiT(**dict(PRESETS[a.preset], size=a.resolution // 8)).eval()
    if a.dtype == "int8":
        dit = torch.ao.quantization.quantize_dynamic(dit, {torch.nn.Linear}, dtype=torch.qint8)
    vae = sdxl_vae()
    print(f"one {a.resolution} px image: {a.steps} dpmpp-2m steps, guidance {a.guidance}, denoiser in {a.dtype}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    start = part = time.perf_counter()

    def lap(what):
        nonlocal part
        now = time.perf_counter(); print(f"{what:<40} {now - part:>9.3f} s"); part = now

    with torch.no_grad():
        tokens = open_clip.tokenize(["an owl with the moon behind it, pixel art"])
        y = tower.ln_final(tower.transformer(tower.token_embedding(tokens) + tower.positional_embedding, attn_mask=tower.attn_mask))
        lap("text tower")
        side = a.resolution // 8
        sigmas = karras(a.steps)
        latents = dpmpp_2m(dit, torch.randn(1, 4, side, side) * sigmas[0], y, sigmas, a.guidance)
        lap("sampling")
        vae.decode(latents / vae.config.scaling_factor).sample
        lap("VAE decode")
    print(f"{'whole image':<40} {time.perf_counter() - start:>9.3f} s")


if __name__ == "__main__":
    main()
