"""UQDM: "Progressive Compression with Universally Quantized Diffusion Models" (Yang, Will &
Mandt, ICLR 2025), on the authors' released weights.

    net       ScoreNet: the VDM score UNet, parameters in the authors' order
    codec     UQDMCodec: tiling, universal quantization, exact coding rows, progressive chunks
    importer  the authors' checkpoint (a torch pickle, read tensors-only) -> our Weights

Where a change goes: the network in net; the noise schedule, quantization, coding tables or
the stream layout in codec; reading other checkpoints in importer.
"""

from .codec import UQDMCodec

__all__ = ["UQDMCodec"]
