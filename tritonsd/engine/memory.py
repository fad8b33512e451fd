"""The memory a generation needs, estimated from the model's sizes before anything is allocated, against the memory
there is, so that a request that cannot fit is refused at once with both figures instead of swapping or failing
deep in an allocation.

The estimate, in bytes: N images of H x W pixels, latents of C x h x w (h = H / f, f the VAE's factor), the UNet
batch B = 2N under guidance and N without, a the model dtype's size:

    latents  4 · 12 · B·C·h·w                 float32 sampler state: latents, carried x0, step noise, the UNet output
    context  a · B · 77 · hidden              the text conditioning, repeated per image (hidden: all towers' widths)
           + 4 · B · adm                      SDXL's conditioning vector for label_emb
    text     a · T · 77 · (8·hidden + mlp)    the text encoder's activations, T = prompts (twice under guidance); the
                                              larger tower's where there are two (they run one after the other)
    unet     a · 48 · B · max_level(ch · px)  the UNet's activations, scaled from its largest level
    vae      v · 6 · N·H·W · c                the VAE decoder at full resolution, c = ch · max(ch_mult[:2]) the
                                              width of its full-resolution layers (img2img encodes one image: less);
                                              v the VAE dtype's size (float32 where an SDXL VAE is upcast)
           + 4 · 3 · N · (h·w)²  on a CPU     its middle attention's float32 scores: q, k and v are strided views,
                                              which sends scaled_dot_product_attention to its math path there (on
                                              CUDA the peaks in the README's Performance, 451 MiB at 512² to
                                              1604 MiB at 1024², grow with the pixels, not their square)
    images   4 · 5 · N·H·W·3                  the decoded images as floats, on the host
    noise    4 · 3 · S·N·C·h·w                a sampler that adds noise: all S steps' noise, drawn up front on the host

    peak = latents + context + noise + images + max(text, unet, vae)

48, 6 and 3 are measured peaks with a margin: peak RSS growth on a CPU in float32, SD 1.5's UNet (batch 2) at 256²
to 512²: 17 to 47 times its largest level; its VAE decoder at 256² and 384²: 4.1 to 4.5 times H·W·c; the tiny test
model's decoder at 192², where the attention dominates: 2.5 score matrices.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tritonsd.engine.config import ModelConfig
from tritonsd.engine.samplers import SamplerPlan
from tritonsd.engine.settings import Settings

UNET_FACTOR = 48
VAE_FACTOR = 6


@dataclass(frozen=True)
class Need:
    device: int  # bytes where the model runs
    host: int  # bytes in system memory besides (on a CPU, the two add up)


def estimate(config: ModelConfig, device: torch.device, dtype: torch.dtype, settings: Settings, plan: SamplerPlan,
             width: int, height: int, vae_dtype: torch.dtype | None = None) -> Need:
    a = dtype.itemsize
    u, v = config.unet, config.vae
    f = 2 ** (len(v.ch_mult) - 1)
    n = settings.images
    b = 2 * n if settings.guided else n
    h, w = height // f, width // f
    latent = u.in_channels * h * w
    largest = max(
        u.model_channels * mult * math.ceil(h / 2**level) * math.ceil(w / 2**level)
        for level, mult in enumerate(u.channel_mult)
    )
    rows = len(settings.prompts) * (2 if settings.guided else 1)
    tokens = config.text.max_position_embeddings
    noisy_steps = len(plan.noise_steps) if any(plan.noise_steps) else 0

    latents = 4 * 12 * b * latent
    context = a * b * tokens * u.context_dim + 4 * b * u.adm_in_channels
    text = max(a * rows * tokens * (8 * t.hidden_size + t.intermediate_size) for t in config.towers)
    unet = a * UNET_FACTOR * b * largest
    vae = (vae_dtype or dtype).itemsize * VAE_FACTOR * n * height * width * v.ch * max(v.ch_mult[:2])
    if device.type != "cuda":
        vae += 4 * 3 * n * (h * w) ** 2
    images = 4 * 5 * n * height * width * 3
    noise = 4 * 3 * noisy_steps * n * latent
    return Need(device=latents + context + max(text, unet, vae), host=images + noise)


def check(need: Need, device: torch.device) -> None:
    """Refuse, with the estimate and the limit, a generation that does not fit: on CUDA its device part in the
    device's free memory and the rest in system memory; on a CPU both in system memory."""
    if device.type == "cuda":
        _fits(need.device, cuda_available(device), f"memory on {device}")
        _fits(need.host, host_available(), "system memory")
    else:
        _fits(need.device + need.host, host_available(), "system memory")


def _fits(need: int, available: int | None, where: str) -> None:
    if available is not None and need > available:
        raise ValueError(
            f"this generation needs about {_size(need)} of {where} (estimated from the model's sizes) but "
            f"{_size(available)} is available; ask for fewer or smaller images"
        )


def cuda_available(device: torch.device) -> int:
    """Free device memory, counting what torch's allocator holds but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def host_available() -> int | None:
    """System memory this process can still take: the least of the kernel's MemAvailable (free pages where there is
    no /proc/meminfo), a cgroup v2 memory limit and an address-space limit (ulimit -v). None when nothing says."""
    limits = []
    meminfo = _fields("/proc/meminfo")
    if "MemAvailable" in meminfo:
        limits.append(meminfo["MemAvailable"])
    elif hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    try:
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            limits.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    try:
        import resource  # POSIX only

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        size = _fields("/proc/self/status").get("VmSize")
        if soft != resource.RLIM_INFINITY and size is not None:
            limits.append(soft - size)
    except ImportError:
        pass
    return max(min(limits), 0) if limits else None


def _fields(path: str) -> dict[str, int]:
    """The `Name: N kB` lines of a /proc file, in bytes."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[name] = int(parts[0]) * 1024
    return out


def _size(n: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**20:.0f} MiB"
