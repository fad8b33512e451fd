"""The networks of a Stable Diffusion model in one module, so that one state dict (unet.*, vae.*, text_encoder.*, and
SDXL base's text_encoder_2.*) holds them all."""

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
        self.text_encoder_2 = None if config.text_2 is None else TextEncoder(config.text_2)

    @property
    def text_encoders(self) -> tuple["TextEncoder", ...]:
        """The text towers, in the order of ModelConfig.towers."""
        return (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)

    @classmethod
    def on_meta(cls, config: ModelConfig) -> "StableDiffusion":
        """Shapes without storage: the loader assigns the checkpoint's tensors, so nothing is initialised twice."""
        with torch.device("meta"):
            return cls(config)
