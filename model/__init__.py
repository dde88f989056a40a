"""Learned image codecs (UQDM, CDC): networks, entropy coding, bitstreams, weights.

Knows nothing of Ray, storage or shards. Entry point: `load_codec(name_or_path)`.

Shared core:
    codec       the Codec interface (compress/decompress, batched; pinned numerics)
    bitstream   the self-describing stream container (header, chunks, CRCs, BitstreamError)
    entropy     rANS coding (constriction) under exact integer frequency rows, both codecs
    images      explicit conversions of files and arrays to HxWx3 uint8
    registry    weights files (safetensors + JSON metadata), name lookup, the catalog of released
                weights (weights/catalog.json), FAMILIES table
    paths       where the team's shared data lives ($DIFFPRESS_SHARED or ../shared)
    files       atomic_path / atomic_folder: local files and checkpoints written whole or not at all
Measuring:
    metrics     psnr, msssim
    evaluation  a codec's bpp, quality and timings on a set of images
    classical   JPEG/WebP/AVIF/HEVC round trips and comparisons at matched bpp/PSNR
    report      an evaluation as files: results.json, results.md, rate-distortion plots
    sidebyside  crops of a learned codec beside AVIF, WebP and JPEG at no more bytes
The exact-arithmetic layer (the one place numbers are made the same on every machine):
    exact/      layers (integer conv, norm, activations), tables, noise, coding helpers, and
                scalar (correctly rounded mpmath reals for load-time constants)
One package per codec family:
    cdc/        Yang & Mandt 2023: config, nets, model (entropy model, diffusion), exact_parts, codec, train
    uqdm/       Yang, Will & Mandt 2025: net, int_net, quantize, codec, importer (the authors' checkpoint)
    weights/    shipped safetensors (cdc-hp128), their training curves, catalog.json

A new codec family: a package with a Codec subclass, and one line in registry.FAMILIES.
"""

from .bitstream import BitstreamError
from .codec import Codec
from .images import ImageDecodeError, as_rgb8, decode_image, to_rgb8
from .registry import available, load_codec

__all__ = ["BitstreamError", "Codec", "ImageDecodeError", "as_rgb8", "available",
           "decode_image", "load_codec", "to_rgb8"]
