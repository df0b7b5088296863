"""The work of `microdit bench text` / `bench vae` with open_clip and diffusers, random weights.

    python3 bench/pytorch_frozen.py text --batch 8 --iters 3
    python3 bench/pytorch_frozen.py vae --latent-size 32 --iters 1
    python3 bench/pytorch_frozen.py photos DIR        # 16 JPEG photographs (scikit-image's)
    python3 bench/pytorch_frozen.py encode DIR --resolution 256 --batch 4
    python3 bench/pytorch_frozen.py eval --batch 8 --iters 2 [--clip vit-h-14-378]
"""
import argparse, statistics, time

import torch


def timed(f, iters):
    f(); ts = []
    for _ in range(iters):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def text(a):
    import open_clip
    from open_clip.transformer import TextTransformer, QuickGELU
    # The text tower of apple/DFN5B-CLIP-ViT-H-14-378 (width 1024, 24 layers, 16 heads, quick GELU).
    tower = TextTransformer(context_length=77, vocab_size=49408, width=1024, heads=16, layers=24, act_layer=QuickGELU).eval()
    prompts = [f"an owl with the moon behind it, pixel art, number {i}" for i in range(a.batch)]
    print(f"open_clip {open_clip.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    @torch.no_grad()
    def encode():
        tokens = open_clip.tokenize(prompts)
        x = tower.token_embedding(tokens) + tower.positional_embedding
        x = tower.transformer(x, attn_mask=tower.attn_mask)
        return tower.ln_final(x)
    t = timed(encode, a.iters)
    print(f"{'tokenize + encode':<40} {t:>9.3f} s   {a.batch / t:>8.2f} prompts/s")


def vae(a):
    import diffusers
    model = sdxl_vae()
    z = torch.randn(1, 4, a.latent_size, a.latent_size)
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    @torch.no_grad()
    def decode():
        return model.decode(z).sample
    t = timed(decode, a.iters)
    print(f"{'decode':<40} {t:>9.3f} s   {1 / t:>8.2f} images/s")


def sdxl_vae():
    from diffusers import AutoencoderKL
    # The SDXL VAE's architecture.
    return AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                         norm_num_groups=32, scaling_factor=0.13025).eval()


def photos(a):
    """Public-domain/CC0 photographs shipped with scikit-image, flipped and re-saved as JPEG."""
    import os
    import skimage.data
    from PIL import Image, ImageOps
    os.makedirs(a.dir, exist_ok=True)
    names = ["astronaut", "chelsea", "coffee", "rocket"]
    for i in range(16):
        img = Image.fromarray(getattr(skimage.data, names[i % 4])()).convert("RGB")
        if i // 4 % 2:
            img = ImageOps.mirror(img)
        if i // 8:
            img = ImageOps.flip(img)
        img.save(os.path.join(a.dir, f"{i:02d}.jpg"), quality=90)


def encode(a):
    """The reference's precompute image path: a DataLoader (2 workers) decoding with PIL and
    resizing with torchvision, then the VAE's encoder and a latent sample."""
    import os
    from PIL import Image
    from torchvision import transforms
    files = sorted(os.path.join(a.dir, f) for f in os.listdir(a.dir) if f.endswith((".jpg", ".png")))
    tf = transforms.Compose([
        transforms.Resize(a.resolution, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(a.resolution), transforms.ToTensor(), transforms.Normalize(0.5, 0.5)])

    class Files(torch.utils.data.Dataset):
        def __init__(self, files): self.files = files
        def __len__(self): return len(self.files)
        def __getitem__(self, i): return tf(Image.open(self.files[i]).convert("RGB"))

    model = sdxl_vae()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    @torch.no_grad()
    def run(files):
        for images in torch.utils.data.DataLoader(Files(files), batch_size=a.batch, num_workers=2):
            model.encode(images).latent_dist.sample()
    run(files[:a.batch])
    timed_files = files[a.batch:]
    t0 = time.perf_counter(); run(timed_files); t = time.perf_counter() - t0
    print(f"{'decode + resize + encode':<40} {t:>9.3f} s   {len(timed_files) / t:>8.2f} images/s")


def eval_networks(a):
    """pytorch-fid's FID Inception (its construction, random weights), open_clip's vision
    tower, and pytorch-fid's Fréchet distance (scipy sqrtm) of 2048-d statistics."""
    import numpy as np
    import pytorch_fid.inception as fi
    from pytorch_fid.fid_score import calculate_frechet_distance
    from open_clip.transformer import VisionTransformer, QuickGELU
    net = fi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = fi.FIDInceptionA(192, 32), fi.FIDInceptionA(256, 64), fi.FIDInceptionA(288, 64)
    net.Mixed_6b, net.Mixed_6c = fi.FIDInceptionC(768, 128), fi.FIDInceptionC(768, 160)
    net.Mixed_6d, net.Mixed_6e = fi.FIDInceptionC(768, 160), fi.FIDInceptionC(768, 192)
    net.Mixed_7b, net.Mixed_7c = fi.FIDInceptionE_1(1280), fi.FIDInceptionE_2(2048)
    fi.fid_inception_v3 = lambda: net
    model = fi.InceptionV3([3]).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    x = torch.rand(a.batch, 3, 299, 299)
    t = timed(lambda: torch.no_grad()(model)(x), a.iters)
    print(f"{'Inception features':<40} {t:>9.3f} s   {a.batch / t:>8.2f} images/s")

    size, width, layers, embed = {"vit-l-14": (224, 1024, 24, 768), "vit-h-14-378": (378, 1280, 32, 1024)}[a.clip]
    tower = VisionTransformer(image_size=size, patch_size=14, width=width, layers=layers, heads=16, mlp_ratio=4.0,
                              output_dim=embed, act_layer=QuickGELU).eval()
    pixels = torch.randn(a.batch, 3, size, size)
    t = timed(lambda: torch.no_grad()(tower)(pixels), a.iters)
    print(f"{'CLIP image features':<40} {t:>9.3f} s   {a.batch / t:>8.2f} images/s")

    rng = np.random.default_rng(0)
    stats = []
    for shift in (0.0, 0.1):
        act = rng.random((4096, 2048), dtype=np.float32) + shift
        stats.append((np.mean(act, axis=0), np.cov(act, rowvar=False)))
    t0 = time.perf_counter(); calculate_frechet_distance(*stats[0], *stats[1]); t = time.perf_counter() - t0
    print(f"{'Fréchet distance, 2048-d':<40} {t:>9.3f} s   {1 / t:>8.2f} distances/s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["text", "vae", "photos", "encode", "eval"])
    ap.add_argument("--clip", default="vit-l-14", choices=["vit-l-14", "vit-h-14-378"])
    ap.add_argument("dir", nargs="?")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--latent-size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=1)
    a = ap.parse_args()
    {"text": text, "vae": vae, "photos": photos, "encode": encode, "eval": eval_networks}[a.what](a)
