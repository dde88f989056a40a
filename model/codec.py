"""The Codec interface: the only thing the pipeline knows about a model.

    codec = load_codec("uqdm-tiny-exact2")
    data = codec.compress(img)                    # HxWx3 uint8 -> bytes
    img2 = codec.decompress(data, steps=None)     # -> HxWx3 uint8

Subclasses implement the batched pair; the single-image calls are thin wrappers.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from . import bitstream
from .bitstream import BitstreamError, Header
from .registry import Weights, describe_weights


class Codec(ABC):
    """A learned image codec bound to one set of weights and one torch device."""

    #: codec family written in every stream ("uqdm", "cdc")
    family: str = ""
    #: True when any prefix of a stream's chunks decodes (UQDM)
    progressive: bool = False
    #: True when one weights file serves several variants ("name:variant", e.g. CDC's rate points)
    has_variants: bool = False

    def __init__(self, weights: Weights, device: str | torch.device | None = None):
        if weights.codec != self.family:
            raise ValueError(f"weights {weights.name!r} are for codec {weights.codec!r}, not {self.family!r}")
        self.weights = weights
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def name(self) -> str:
        return self.weights.name

    @property
    def weights_digest(self) -> bytes:
        return self.weights.digest

    def compress(self, img: np.ndarray) -> bytes:
        return self.compress_batch([img])[0]

    def decompress(self, data: bytes, steps: int | None = None, **options) -> np.ndarray:
        return self.decompress_batch([data], steps=steps, **options)[0]

    @abstractmethod
    def compress_batch(self, imgs: Sequence[np.ndarray]) -> list[bytes]:
        """Encode HxWx3 uint8 images (any sizes) to self-describing bitstreams."""

    @abstractmethod
    def decompress_batch(self, datas: Sequence[bytes], steps: int | None = None,
                         **options) -> list[np.ndarray]:
        """Decode bitstreams; `steps` is the number of diffusion steps to spend."""

    def read_header(self, data: bytes) -> Header:
        """Parse a stream's header and check that these weights can decode it."""
        header = bitstream.read_header(data)
        if header.codec != self.family:
            raise BitstreamError(f"stream was written by codec {header.codec!r}; this is {self.family!r}")
        if header.weights_digest != self.weights_digest[:bitstream.DIGEST_BYTES]:
            raise BitstreamError(
                f"stream was written with other weights than {self.name!r} (digest "
                f"{self.weights_digest[:bitstream.DIGEST_BYTES].hex()}): {describe_weights(header.weights_digest)}")
        return header

    def unpack(self, data: bytes, n_chunks: int | None = None) -> tuple[Header, list[bytes]]:
        self.read_header(data)
        return bitstream.unpack(data, n_chunks)

    def pack(self, height: int, width: int, chunks: list[bytes], params: bytes = b"") -> bytes:
        return bitstream.pack(self.family, self.weights_digest, height, width, chunks, params)

    @contextlib.contextmanager
    def float_numerics(self) -> Iterator[None]:
        """Inference mode, and on a GPU full float32 matmuls (no TF32) for the float decoders.

        Nothing that decides a coding table runs in floats (see model.exact); the float
        decoders' pixels then stay within a level or two of a CPU's. Every global setting
        changed here is restored on exit, also after an exception.
        """
        saved = _numerics_settings()
        try:
            if self.device.type != "cpu":
                _set_numerics_settings(saved.threads, deterministic=True, benchmark=False,
                                       matmul_tf32=False, cudnn_tf32=False)
            with torch.inference_mode():
                yield
        finally:
            _set_numerics_settings(*saved)


class _NumericsSettings(NamedTuple):
    threads: int
    deterministic: bool
    benchmark: bool
    matmul_tf32: bool
    cudnn_tf32: bool


def _numerics_settings() -> _NumericsSettings:
    return _NumericsSettings(torch.get_num_threads(), torch.backends.cudnn.deterministic,
                             torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
                             torch.backends.cudnn.allow_tf32)


def _set_numerics_settings(threads: int, deterministic: bool, benchmark: bool, matmul_tf32: bool,
                           cudnn_tf32: bool) -> None:
    torch.set_num_threads(threads)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    torch.backends.cudnn.allow_tf32 = cudnn_tf32
