"""The three networks of SD 1.x and 2.x in one module, so that one state dict (unet.*, vae.*, text_encoder.*) holds them
all."""

import torch
from torch import nn

from tritonsd.engine.config import ModelConfig
from tritonsd.engine.text_encoder import TextEncoder
from tritonsd.engine.unet import UNet
from tritonsd.engine.vae import VAE


class StableDiffusion(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.unet = UNet(config.unet)
        self.vae = VAE(config.vae)
        self.text_encoder = TextEncoder(config.text)

    @classmethod
    def on_meta(cls, config: ModelConfig) -> "StableDiffusion":
        """Shapes without storage: the loader assigns the checkpoint's tensors, so nothing is initialised twice."""
        with torch.device("meta"):
            return cls(config)
