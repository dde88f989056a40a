"""The Codec interface: the only thing the pipeline knows about a model.

    codec = load_codec("uqdm-tiny-exact2")
    data = codec.compress(img)                    # HxWx3 uint8 -> bytes
    img2 = codec.decompress(data, steps=None)     # -> HxWx3 uint8

    latents = codec.decode_latents(datas)         # the exact half: entropy decoding, integer nets
    imgs = codec.synthesize(latents, steps=2)     # the float half, batched on codec.device

Decoding is split in two so that the halves can run in different places: `decode_latents`
is cheap, exact and needs no GPU (DataLoader workers, Ray tasks); `synthesize` runs the float
networks batched across images on the codec's device (the training loop's GPU). Latents are
small picklable dataclasses (numpy arrays and header fields) that cross process boundaries.
`decompress_batch` is the two in a row. Subclasses implement compress_batch, decode_latents,
synthesize_tensors and decompress_batch; the single-image calls are thin wrappers.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from . import bitstream
from .bitstream import BitstreamError, Header
from .registry import Weights, describe_weights

#: the most diffusion steps a decode may ask for (a bound every reader can check before decoding)
MAX_STEPS = 1000


@dataclass(frozen=True)
class Latents:
    """The exact half of one stream's decode: what `synthesize` turns into pixels.

    Every field is decided exactly (the same on every machine); subclasses add numpy arrays.
    `weights_digest` is the stream's (bitstream.DIGEST_BYTES bytes): synthesize refuses latents
    of other weights.
    """

    family: str
    weights_digest: bytes
    height: int
    width: int


@dataclass(frozen=True)
class DecodedPixels(Latents):
    """Latents of a codec whose exact half decodes everything (UQDM: exact integers to the last
    pixel): the image itself, which synthesize only hands on."""

    pixels: np.ndarray  # HxWx3 uint8


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
        """Decode bitstreams; `steps` is the number of diffusion steps to spend.
        Always synthesize(decode_latents(datas, ...), steps, ...)."""

    @abstractmethod
    def decode_latents(self, datas: Sequence[bytes], **options) -> list[Latents]:
        """The exact half of decoding (entropy decoding, integer networks): cheap, the same on
        every machine. Raises BitstreamError for a stream that does not decode."""

    @abstractmethod
    def synthesize_tensors(self, latents: Sequence[Latents], steps: int | None = None,
                           **options) -> list[torch.Tensor]:
        """The float half, batched across images on self.device: 3xHxW uint8 tensors there."""

    def synthesize(self, latents: Sequence[Latents], steps: int | None = None, **options) -> list[np.ndarray]:
        """synthesize_tensors as HxWx3 uint8 arrays."""
        return [np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
                for image in self.synthesize_tensors(latents, steps, **options)]

    def check_latents(self, latents: Sequence[Latents], kind: type[Latents]) -> None:
        """Refuse latents that another codec or other weights decoded."""
        digest = self.weights_digest[:bitstream.DIGEST_BYTES]
        for item in latents:
            if not isinstance(item, kind) or item.family != self.family or item.weights_digest != digest:
                raise ValueError(f"latents of a {getattr(item, 'family', type(item).__name__)!r} stream with weights "
                                 f"{getattr(item, 'weights_digest', b'').hex()} cannot be synthesized by {self.name!r} "
                                 f"(weights {digest.hex()})")

    def latents_header(self, header: Header) -> dict:
        """The Latents fields every codec takes from a stream's header."""
        return {"family": self.family, "weights_digest": header.weights_digest, "height": header.height,
                "width": header.width}

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
