"""CDC: "Lossy Image Compression with Conditional Diffusion Models" (Yang & Mandt, NeurIPS 2023)."""

from .codec import CDCCodec

__all__ = ["CDCCodec"]
