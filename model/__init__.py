"""Learned image codecs (UQDM, CDC): networks, entropy coding, bitstreams, weights.

Knows nothing of Ray, storage or shards. Entry point: `load_codec(name_or_path)`.
"""

from .bitstream import BitstreamError
from .codec import Codec
from .images import ImageDecodeError, as_rgb8, decode_image, to_rgb8
from .registry import available, load_codec

__all__ = ["BitstreamError", "Codec", "ImageDecodeError", "as_rgb8", "available",
           "decode_image", "load_codec", "to_rgb8"]
