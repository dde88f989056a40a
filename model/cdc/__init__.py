"""CDC: "Lossy Image Compression with Conditional Diffusion Models" (Yang & Mandt, NeurIPS 2023).

    config   CDCConfig (network sizes, stored in weights files; PRESETS "small", "paper"),
             TrainConfig (one training run)
    nets     the networks: analysis/hyper transforms, conditioning decoder, denoising UNet
    model    CDCModel: hyperprior entropy model with rANS (compressai), training loss, DDIM sampling
    codec    CDCCodec: the Codec (stream layout, padding, decode options steps/stochastic/seed)
    train    the training loop, checkpoints, export to a weights file, the Ray Train driver (fit)

Where a change goes: network shapes in nets (and config if it needs a size); what is coded
or how it is sampled in model; the stream layout in codec; optimisation in train.
"""

from .codec import CDCCodec

__all__ = ["CDCCodec"]
