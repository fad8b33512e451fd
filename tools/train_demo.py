"""Train the small demo model that ships with tritonsd on the procedural shapes data set (tools/shapes.py), on CPU.

Stage 1 trains the VAE (64x64 pictures <-> 16x16x4 latents); stage 2 freezes it and trains the UNet and the text
encoder as SD1.x was trained: epsilon prediction under the scaled-linear schedule, the caption dropped to "" one time
in ten for classifier-free guidance, an EMA of the weights kept for sampling. The result is written as an original
SD1 single file (float16) with its ModelConfig beside it as NAME.json, rewritten at every checkpoint so a stopped run
leaves a usable model.

    TRITONSD_KERNELS=torch python -m tools.train_demo --out engine/data/demo/demo.safetensors
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("TRITONSD_KERNELS", "torch")

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F

from tritonsd import loader
from tritonsd.engine.config import ModelConfig
from tritonsd.engine.model import StableDiffusion
from tritonsd.engine.samplers import ALPHAS_CUMPROD
from tritonsd.engine.tokenizer import CLIPTokenizer
from tritonsd.files import atomic_write
from tritonsd.loader.convert import to_original
from tools import shapes

# 64x64 pictures, latents 4x smaller; the real CLIP vocabulary so the real tokenizer drives it; a few M parameters.
CONFIG = ModelConfig.from_dict({
    "unet": dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2, 4),
                 num_heads=2, transformer_depth=1, context_dim=64, norm_groups=8, sample_size=16),
    "vae": dict(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=4, embed_dim=4, norm_groups=8),
    "text": dict(vocab_size=49408, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                 max_position_embeddings=77),
})


def save(model: StableDiffusion, path: Path) -> None:
    """The original single-file layout in float16, and the config as NAME.json beside it; each appears whole."""
    state = to_original({name: t.detach().to(torch.float16).contiguous() for name, t in model.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, write in ((path, lambda p: safetensors.torch.save_file(state, p)),
                          (path.with_suffix(".json"), lambda p: p.write_text(json.dumps(model.config.to_dict(), indent=1)))):
        with atomic_write(target) as tmp:
            write(tmp)


def pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(model: StableDiffusion, images: torch.Tensor, steps: int, minutes: float, batch: int,
              gen: torch.Generator) -> None:
    vae = model.vae
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    start = time.time()
    for step in range(steps):
        if time.time() - start > minutes * 60:
            print(f"vae time budget reached at step {step}", flush=True)
            break
        idx = torch.randint(len(images), (batch,), generator=gen)
        x = images[idx]
        mean, logvar = vae.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
        recon = vae.decode(z)
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = rec + 1e-4 * kl
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"vae step {step:5d} {time.time() - start:6.0f}s rec {rec.item():.4f} kl {kl.item():.3f}", flush=True)


@torch.no_grad()
def encode_all(model: StableDiffusion, images: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), chunk):
        mean, logvar = model.vae.encode(images[i : i + chunk])
        means.append(mean)
        stds.append(torch.exp(0.5 * logvar))
    return torch.cat(means), torch.cat(stds)


def train_diffusion(model: StableDiffusion, ema: StableDiffusion, latents: tuple[torch.Tensor, torch.Tensor],
                    ids: torch.Tensor, empty: torch.Tensor, args, out: Path, gen: torch.Generator) -> None:
    """Epsilon prediction on scaled latents; UNet and text encoder train together, EMA copies are what gets saved."""
    means, stds = latents
    scale = model.config.vae.scaling_factor
    alphas = torch.from_numpy(ALPHAS_CUMPROD.astype(np.float32))
    params = list(model.unet.parameters()) + list(model.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_params = list(ema.unet.parameters()) + list(ema.text_encoder.parameters())
    steps = args.steps
    start, last_save, running = time.time(), time.time(), None
    for step in range(steps):
        idx = torch.randint(len(means), (args.batch,), generator=gen)
        x0 = scale * (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen))
        text = ids[idx].clone()
        text[torch.rand(args.batch, generator=gen) < args.uncond] = empty
        t = torch.randint(len(alphas), (args.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(model.unet(xt, t, model.text_encoder(text)[0]), noise)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # The EMA starts short and lengthens, so early checkpoints are not dominated by the random initialisation.
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0:
            elapsed = time.time() - start
            print(f"unet step {step:6d}/{steps} {elapsed:6.0f}s loss {running:.4f} lr {opt.param_groups[0]['lr']:.2e}",
                  flush=True)
        if time.time() - last_save > args.save_every * 60 or step == steps - 1:
            save(ema, out)
            last_save = time.time()
            print(f"saved {out} at step {step}", flush=True)
        if time.time() - start > args.minutes * 60:
            save(ema, out)
            print(f"time budget reached at step {step}; saved {out}", flush=True)
            break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tritonsd/engine/data/demo/demo.safetensors"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=16000, help="pictures in the training pool")
    parser.add_argument("--vae-steps", type=int, default=510)
    parser.add_argument("--vae-minutes", type=float, default=10.0, help="wall-time cap of stage 1")
    parser.add_argument("--vae-from", type=Path, help="take the (frozen) VAE of this checkpoint and skip stage 1")
    parser.add_argument("--init", type=Path, help="start stage 2 from this checkpoint's UNet and text encoder too")
    parser.add_argument("--minutes", type=float, default=45.0, help="wall-time cap of stage 2")
    parser.add_argument("--steps", type=int, default=3200, help="stage-2 steps (the learning-rate schedule's length)")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--uncond", type=float, default=0.1, help="probability of training on the empty caption")
    parser.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    images_np, captions, _ = shapes.dataset(args.samples, start=args.seed * args.samples)
    images = pixels(images_np)
    tokenizer = CLIPTokenizer.default()
    ids = tokenizer(captions)
    empty = tokenizer([""])[0]
    print(f"{args.samples} pictures and captions in {time.time() - t0:.0f}s", flush=True)

    model = StableDiffusion(CONFIG)
    scaling = None
    if args.init or args.vae_from:
        trained, _ = loader.load(args.init or args.vae_from)
        parts = ("vae", "unet", "text_encoder") if args.init else ("vae",)
        for part in parts:
            getattr(model, part).load_state_dict(getattr(trained, part).state_dict())
        # A UNet trained further must see latents scaled as before.
        scaling = trained.config.vae.scaling_factor if args.init else None
    else:
        train_vae(model, images, args.vae_steps, args.vae_minutes, 16, gen)
    model.vae.requires_grad_(False).eval()

    means, stds = encode_all(model, images)
    sample = means + stds * torch.randn(means.shape, generator=gen)
    scaling = scaling or round(1.0 / sample.std().item(), 5)
    model.config = dataclasses.replace(CONFIG, vae=dataclasses.replace(CONFIG.vae, scaling_factor=scaling))
    model.vae.scaling_factor = model.config.vae.scaling_factor
    with torch.no_grad():
        recon = model.vae.decode(means[:256])
    print(f"latent std {sample.std().item():.4f} -> scaling_factor {model.config.vae.scaling_factor}; "
          f"reconstruction MAE {(recon - images[:256]).abs().mean().item() * 127.5:.2f}/255", flush=True)
    ema = copy.deepcopy(model).requires_grad_(False)
    train_diffusion(model, ema, (means, stds), ids, empty, args, args.out, gen)


if __name__ == "__main__":
    main()
