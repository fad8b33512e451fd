"""The shape table the GPU tests, the compile test and the benchmarks share (tools/sd15_shapes.py): derived from a
ModelConfig, it must list what the engine's networks actually hand each kernel op, and for ModelConfig() at 512x512
it must be SD 1.5's."""

import torch

import tritonsd.kernels
from tritonsd.engine.model import StableDiffusion
from tiny import TINY
from tools.sd15_shapes import SD15, shapes


def engine_shapes(config, image: int, monkeypatch) -> dict[str, set]:
    """Run the text encoder, a guided UNet call and the VAE decode on the meta device (shapes, no arithmetic), recording
    the shape each kernel op is given: (B, H, Lq, Lk, D) for attention, the input's shape for the others."""
    seen = {op: set() for op in tritonsd.kernels.OPS}

    def recording(op, fn):
        def record(*args, **kwargs):
            x = args[0]
            seen[op].add((*x.shape[:3], args[1].shape[2], x.shape[3]) if op == "attention" else tuple(x.shape))
            return fn(*args, **kwargs)
        return record

    for op in tritonsd.kernels.OPS:
        monkeypatch.setattr(tritonsd.kernels, op, recording(op, getattr(tritonsd.kernels, op)))
    model = StableDiffusion.on_meta(config)
    latent = image // 2 ** (len(config.vae.ch_mult) - 1)
    with tritonsd.kernels.backend("torch"), torch.inference_mode(), torch.device("meta"):
        context, _ = model.text_encoder(torch.zeros(2, config.text.max_position_embeddings, dtype=torch.long))
        model.unet(torch.empty(2, config.unet.in_channels, latent, latent), torch.empty(2), context)
        model.vae.decode(torch.empty(1, config.vae.embed_dim, latent, latent))
    return seen


def test_the_table_lists_what_the_engine_launches(monkeypatch):
    table, seen = shapes(TINY, 32), engine_shapes(TINY, 32, monkeypatch)
    assert set(table.attention) | {table.text_attention, table.vae_attention} == seen["attention"]
    assert set(table.geglu) == seen["geglu"]
    assert set(table.layer_norm) | {table.text_layer_norm} == seen["layer_norm"]
    listed = {*table.unet_group_norm, *table.unet_skip_group_norm, *table.vae_group_norm}
    assert listed <= seen["group_norm"], f"not launched by the engine: {sorted(listed - seen['group_norm'])}"
    assert set(table.vae_group_norm) == {s for s in seen["group_norm"] if s[0] == 1}, "the VAE decoder's differ"


def test_sd15_at_512():
    assert SD15.attention == [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
                              (2, 8, 256, 256, 160), (2, 8, 256, 77, 160), (2, 8, 64, 64, 160), (2, 8, 64, 77, 160)]
    assert SD15.text_attention == (2, 12, 77, 77, 64) and SD15.vae_attention == (1, 1, 4096, 4096, 512)
    assert SD15.unet_group_norm == [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8)]
    assert SD15.unet_skip_group_norm == [(2, 960, 32, 32), (2, 1920, 16, 16), (2, 2560, 8, 8)]
    assert SD15.vae_group_norm == [(1, 512, 64, 64), (1, 512, 128, 128), (1, 512, 256, 256), (1, 256, 256, 256),
                                   (1, 256, 512, 512), (1, 128, 512, 512)]
    assert SD15.geglu == [(2, 4096, 2560), (2, 1024, 5120), (2, 256, 10240), (2, 64, 10240)]
    assert SD15.layer_norm == [(2, 4096, 320), (2, 1024, 640), (2, 256, 1280), (2, 64, 1280)]
    assert SD15.text_layer_norm == (2, 77, 768) and SD15.step == (1, 4, 64, 64)
