"""The shapes Stable Diffusion 1.5's (and SD 2.1 768's) networks hand each kernel while drawing a 512x512 image with guidance: the one
table the GPU tests, the ahead-of-time compile test and the benchmarks take their cases from. Everything is derived
from ModelConfig() (the SD 1.x sizes) by the engine's own structure; `shapes(config, image)` gives them for another
model or size."""

from __future__ import annotations

from typing import NamedTuple

from tritonsd.engine.config import SD2_V, ModelConfig

IMAGE = 512
# Classifier-free guidance runs the UNet and the text encoder on the unconditional and conditional halves together.
GUIDED_BATCH = 2


class Shapes(NamedTuple):
    attention: list[tuple[int, int, int, int, int]]  # UNet (B, H, Lq, Lk, D): per attention level, self then cross
    text_attention: tuple[int, int, int, int, int]  # the text encoder's causal self-attention
    vae_attention: tuple[int, int, int, int, int]  # the VAE's single-head attention over all latent pixels
    unet_group_norm: list[tuple[int, int, int, int]]  # (N, C, H, W) at each UNet level
    unet_skip_group_norm: list[tuple[int, int, int, int]]  # up-path ResBlocks joining a level to the level above
    vae_group_norm: list[tuple[int, int, int, int]]  # the VAE decoder's, one image
    geglu: list[tuple[int, int, int]]  # (B, L, 2I) per attention level
    layer_norm: list[tuple[int, int, int]]  # (B, L, C) per attention level
    text_layer_norm: tuple[int, int, int]
    step: tuple[int, int, int, int]  # the latents of one image


def shapes(config: ModelConfig = ModelConfig(), image: int = IMAGE) -> Shapes:
    u, v, t = config.unet, config.vae, config.text
    b, tokens = GUIDED_BATCH, t.max_position_embeddings
    latent = image // 2 ** (len(v.ch_mult) - 1)
    levels = [(latent // 2**i, u.model_channels * m) for i, m in enumerate(u.channel_mult)]
    # Levels whose blocks attend, and the middle block at the deepest level, which always does.
    attending = [level for i, level in enumerate(levels) if 2**i in u.attention_resolutions] + [levels[-1]]
    attention = [(b, u.heads(c), side * side, lk, c // u.heads(c))
                 for side, c in attending for lk in (side * side, tokens)]

    vae_chs = [v.ch * m for m in v.ch_mult]
    vae, ch, side = [], vae_chs[-1], latent
    for i in reversed(range(len(vae_chs))):  # the decoder: each level's ResBlocks normalise their inputs
        for _ in range(v.num_res_blocks + 1):
            vae += [(1, ch, side, side), (1, vae_chs[i], side, side)]
            ch = vae_chs[i]
        side *= 2 if i else 1

    return Shapes(
        attention=attention,
        text_attention=(b, t.num_attention_heads, tokens, tokens, t.hidden_size // t.num_attention_heads),
        vae_attention=(1, 1, latent * latent, latent * latent, vae_chs[-1]),
        unet_group_norm=[(b, c, side, side) for side, c in levels],
        unet_skip_group_norm=[(b, c + levels[i - 1][1], side, side) for i, (side, c) in enumerate(levels) if i],
        vae_group_norm=list(dict.fromkeys(vae)),
        geglu=[(b, side * side, 2 * 4 * c) for side, c in attending],
        layer_norm=[(b, side * side, c) for side, c in attending],
        text_layer_norm=(b, tokens, t.hidden_size),
        step=(1, u.in_channels, latent, latent),
    )


SD15 = shapes()
# SD 2.1's 768 model: heads 64 wide at every level.
SD21_768 = shapes(SD2_V, 768)
# Beyond SD 1.5, for bandwidth: the VAE's widest channels at full resolution.
GROUP_NORM_STRESS = (1, 512, 512, 512)
