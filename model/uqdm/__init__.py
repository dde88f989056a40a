"""UQDM: "Progressive Compression with Universally Quantized Diffusion Models" (Yang, Will & Mandt, ICLR 2025)."""

from .codec import UQDMCodec

__all__ = ["UQDMCodec"]
