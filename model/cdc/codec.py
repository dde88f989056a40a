"""The CDC codec: exact hyperprior symbols, then a 0-step mean image or a diffusion decode.

Stream (inside the model.bitstream container), params = the rate point (1 byte):
    chunk 0   CRC32 of the z symbols, then z coded with one integer table per channel
    chunk 1   CRC32 of the y symbols, then y coded with one integer table per scale level:
              in one part (hyperprior weights, cdc-hp128), or in the context model's passes,
              group by group, anchors first (weights with `context_groups`)
The image is edge-padded to a multiple of 64, so every shape follows from the header.

Everything that decides a symbol is exact (`exact_parts`): a stream decodes to the same
symbols on every machine, and a CRC of the decoded symbols turns any damage into a
BitstreamError. The pixels come from float networks (the content decoder and, for
steps > 0, the denoising UNet): on other CPU kernels or a GPU they may differ by a level
or two (bounded by the tests), never more.

    codec = load_codec("cdc-hp128")                 # rate point from the weights' default
    codec = load_codec("cdc-hp128:q3")              # or a named rate point
    data = codec.compress(img)
    img0 = codec.decompress(data)                   # steps=0: the content path's mean image (fastest, best PSNR)
    img4 = codec.decompress(data, steps=4)          # 4 DDIM steps: synthesized texture (deterministic, seed 0)
    img5 = codec.decompress(data, steps=4, stochastic=True, seed=None)
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import entropy, exact
from ..bitstream import BitstreamError, Header, read_varint, varint
from ..codec import Codec
from ..images import as_rgb8
from ..registry import Weights
from .exact_parts import CodePass, ExactContext, ExactHyperDecoder
from .config import CDCConfig
from .model import STRIDE, CDCModel

#: parameters only training needs (the stream's tables come from their exact integer export)
TRAINING_ONLY = ("h_s.", "z_density.")

MAX_STEPS = 1000
DEFAULT_SEED = 0
_CRC = struct.Struct(">I")
_PARAMS = struct.Struct(">B")  # rate point


class CDCCodec(Codec):
    family = "cdc"

    has_variants = True  # the rate points: load_codec("cdc-hp128:q2")

    def __init__(self, weights: Weights, device: str | torch.device | None = None, variant: str | None = None):
        super().__init__(weights, device)
        self.config = CDCConfig.from_dict(weights.config["model"])
        self.rate_names = list(weights.config["rates"])
        self.rate = self._rate_index(weights.config["default_rate"] if variant is None else variant)
        self.model = CDCModel(self.config)
        floats = {k: v.float() for k, v in weights.tensors.items() if not k.startswith("exact.")}
        needed = {n for n, _ in self.model.named_parameters() if not n.startswith(TRAINING_ONLY)}
        if needed - floats.keys():
            raise ValueError(f"weights {weights.name!r} lack CDC parameters {sorted(needed - floats.keys())[:5]}")
        self.model.load_state_dict(floats, strict=False)
        self.model.eval().to(self.device)
        exact_tensors = {k[len("exact."):]: v for k, v in weights.tensors.items() if k.startswith("exact.")}
        self.hyper = ExactHyperDecoder(exact_tensors, self.config.scale_levels, self.device)
        self.context = (ExactContext(exact_tensors, self.config.context_groups, self.config.scale_levels, self.device)
                        if self.config.context_groups else None)
        self.default_steps = self.config.default_steps

    @property
    def name(self) -> str:
        return f"{self.weights.name}:{self.rate_names[self.rate]}"

    def _rate_index(self, rate: str) -> int:
        if rate not in self.rate_names:
            raise ValueError(f"unknown rate point {rate!r}; {self.weights.name} has {', '.join(self.rate_names)}")
        return self.rate_names.index(rate)

    # ----- encoding ------------------------------------------------------------------------
    def compress_batch(self, imgs: Sequence[np.ndarray]) -> list[bytes]:
        out = []
        with self.float_numerics():
            for img in map(as_rgb8, imgs):
                z, k, y_parts = self._encode(img)
                z_chunk = _symbols_chunk(z, [(z, _channel_groups(z))], self.hyper.z_tables)
                y_chunk = _symbols_chunk(k, y_parts, self.hyper.y_tables)
                shortfall = _minimum_payload(*img.shape[:2]) - len(z_chunk) - len(y_chunk)
                if shortfall > 0:
                    y_chunk = _symbols_chunk(k, y_parts, self.hyper.y_tables, padding=shortfall)
                chunks = [z_chunk, y_chunk]
                out.append(self.pack(img.shape[0], img.shape[1], chunks, _PARAMS.pack(self.rate)))
        return out

    def encode_symbols(self, img: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The integer (z, y) symbols a stream of `img` carries, already within the tables' range."""
        z, k, _ = self._encode(img)
        return z, k

    def _encode(self, img: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(z, k, the y chunk's parts as (symbols, table levels) in coding order)."""
        rate = torch.tensor([self.rate], device=self.device)
        y = self.model.g_a(self._to_padded_tensor(as_rgb8(img))).double() * self.model.gains(rate)[0].double()
        z = torch.round(self.model.h_a(y.float()).double())
        z = torch.maximum(torch.minimum(z, self._z_limit(z)), -self._z_limit(z))
        widths, parts = self.hyper.y_widths.to(self.device), []

        def encode_pass(part: slice, levels: torch.Tensor, means: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            limit = widths[levels].double()
            k = torch.maximum(torch.minimum(torch.round(y[:, part] - means), limit), -limit)
            parts.append((k[mask].long(), levels[mask]))
            return k

        _, k = self._code_y(z.long(), encode_pass)
        return z.long(), k.long(), parts

    def _code_y(self, z: torch.Tensor, code_pass: CodePass) -> tuple[torch.Tensor, torch.Tensor]:
        """(means, k) of y, coding its passes with `code_pass` (the hyperprior alone: one pass)."""
        levels, means = self.hyper(z)
        if self.context is not None:
            return self.context.code(levels, means, code_pass)
        return means, code_pass(slice(None), levels, means, torch.ones_like(levels, dtype=torch.bool)).double()

    def _z_limit(self, z: torch.Tensor) -> torch.Tensor:
        return self.hyper.z_widths.to(z.device, z.dtype)[None, :, None, None].expand_as(z)

    # ----- decoding ------------------------------------------------------------------------
    def decompress_batch(self, datas: Sequence[bytes], steps: int | None = None, stochastic: bool = False,
                         seed: int | None = DEFAULT_SEED) -> list[np.ndarray]:
        """Decode streams: `steps` = 0 gives the mean image; > 0, that many DDIM steps.

        Deterministic decoding (eta = 0) starts from noise drawn with `seed`; `stochastic=True`
        uses eta = 1 with fresh noise at every step: the texture changes with the seed, and
        `seed=None` draws a new one each call. Noise comes from an integer generator, the
        same on every machine.
        """
        steps = self.default_steps if steps is None else steps
        if not isinstance(steps, int) or not 0 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be an integer in 0..{MAX_STEPS}, got {steps!r}")
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (1 << 32))
        images = []
        with self.float_numerics():
            for data in datas:
                header, rate, y_hat = self._decode_latents(data)
                x_mean, features = self.model.decode_content(y_hat.float(), torch.tensor([rate], device=self.device))
                x = x_mean if steps == 0 else self._sample(x_mean, features, steps, stochastic, seed)
                images.append(_to_uint8(x[0, :, :header.height, :header.width]))
        return images

    def decode_symbols(self, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        """The (z, y) integer symbols stored in a stream."""
        header, chunks, _ = self._checked(data)
        with torch.inference_mode():
            z, k, _ = self._entropy_decode(header, chunks)
        return z, k

    def _decode_latents(self, data: bytes) -> tuple[Header, int, torch.Tensor]:
        header, chunks, rate = self._checked(data)
        z, k, means = self._entropy_decode(header, chunks)
        return header, rate, k.double() + means

    def _checked(self, data: bytes) -> tuple[Header, list[bytes], int]:
        header, chunks = self.unpack(data)
        if len(chunks) != 2 or len(header.params) != _PARAMS.size:
            raise BitstreamError(f"a CDC stream has 2 chunks and {_PARAMS.size} parameter byte; this one has "
                                 f"{len(chunks)} chunks and {len(header.params)} parameter bytes")
        (rate,) = _PARAMS.unpack(header.params)
        if rate >= len(self.rate_names):
            raise BitstreamError(f"corrupt CDC parameters (rate point {rate})")
        _check_work(header, chunks)
        return header, chunks, rate

    def _entropy_decode(self, header: Header, chunks: list[bytes]):
        ph, pw = _padded(header.height, header.width)
        z_shape = (1, self.config.n, ph // STRIDE, pw // STRIDE)
        z = _decode_chunk(chunks[0], _channel_groups(torch.zeros(z_shape)), self.hyper.z_tables, "z").reshape(z_shape)
        z = torch.from_numpy(z).to(self.device)
        decoder, crc = _open_chunk(chunks[1], "y")

        def decode_pass(part: slice, levels: torch.Tensor, means: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            k = torch.zeros(levels.shape, dtype=torch.float64, device=self.device)
            values = decoder.decode(levels[mask].cpu().numpy(), self.hyper.y_tables)
            k[mask] = torch.from_numpy(values).to(self.device, torch.float64)
            return k

        means, k = self._code_y(z, decode_pass)
        decoder.finish()
        _check_symbols(k.long().cpu().numpy().ravel(), crc, "y")
        return z, k.long(), means

    def _sample(self, x_mean, features, steps: int, stochastic: bool, seed: int) -> torch.Tensor:
        shape = x_mean.shape
        draws = iter(range(1, 1 << 20))

        def noise(size) -> torch.Tensor:
            values = exact.normal_noise(seed, next(draws), int(np.prod(size))) * exact.NOISE_SCALE
            return torch.from_numpy(values.astype(np.float32)).reshape(size).to(self.device)

        return self.model.sample(x_mean, features, noise(shape), steps, eta=1.0 if stochastic else 0.0,
                                 fresh_noise=noise)

    # ----- pixels <-> tensors ----------------------------------------------------------------
    def _to_padded_tensor(self, img: np.ndarray) -> torch.Tensor:
        height, width = img.shape[:2]
        x = torch.tensor(img).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
        ph, pw = _padded(height, width)
        # Edge replication: unlike reflection it works for 1-pixel images and adds no texture.
        return F.pad(x, (0, pw - width, 0, ph - height), mode="replicate").to(self.device)


def _padded(height: int, width: int) -> tuple[int, int]:
    return -(-height // STRIDE) * STRIDE, -(-width // STRIDE) * STRIDE


def _channel_groups(z: torch.Tensor) -> torch.Tensor:
    return torch.arange(z.shape[1]).reshape(1, -1, 1, 1).expand(z.shape)


def _symbols_chunk(symbols: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]], tables,
                   padding: int = 0) -> bytes:
    """CRC32 of all the symbols (in tensor order), the coder's length (varint), the parts
    (symbols, table of each) coded in order, then `padding` zero bytes."""
    values = symbols.cpu().numpy().ravel()
    coded = entropy.encode_parts([(s.cpu().numpy(), g.cpu().numpy()) for s, g in parts], tables)
    return _CRC.pack(zlib.crc32(values.astype("<i4").tobytes())) + varint(len(coded)) + coded + bytes(padding)


def _open_chunk(chunk: bytes, what: str) -> tuple[entropy.PartsDecoder, int]:
    """A decoder of the chunk's coded parts, and the CRC the decoded symbols must have."""
    if len(chunk) < _CRC.size + 1:
        raise BitstreamError(f"CDC {what} chunk too short")
    length, start = read_varint(chunk, _CRC.size)
    if start + length > len(chunk) or any(chunk[start + length:]):
        raise BitstreamError(f"CDC {what} chunk is corrupt (its coded length does not fit)")
    return entropy.PartsDecoder(chunk[start:start + length]), _CRC.unpack_from(chunk)[0]


def _check_symbols(values: np.ndarray, crc: int, what: str) -> None:
    if zlib.crc32(values.astype("<i4").tobytes()) != crc:
        raise BitstreamError(f"the {what} symbols decoded to other values than were encoded: the stream is corrupt")


def _decode_chunk(chunk: bytes, groups: torch.Tensor, tables, what: str) -> np.ndarray:
    decoder, crc = _open_chunk(chunk, what)
    values = decoder.decode(groups.cpu().numpy().ravel(), tables)
    decoder.finish()
    _check_symbols(values, crc, what)
    return values


def _minimum_payload(height: int, width: int) -> int:
    """Bytes a CDC stream carries at least: one per 2^16 (padded) pixels.

    A flat image can code in almost no bits, so a hostile header could claim a huge image
    over a few bytes and make the decoder allocate gigabytes. Encoders pad up to this
    (6 bytes for a 768x512 photo, nothing for any real one), and decoders refuse less
    before allocating anything.
    """
    ph, pw = _padded(height, width)
    return -(-ph * pw // (1 << 16))


def _check_work(header: Header, chunks: list[bytes]) -> None:
    carried, needed = sum(len(c) for c in chunks), _minimum_payload(header.height, header.width)
    if carried < needed:
        raise BitstreamError(f"header claims {header.height}x{header.width} pixels, more than its {carried} "
                             f"payload bytes can describe (at least {needed}): corrupt or hostile")


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    pixels = ((x.float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray(pixels.permute(1, 2, 0).numpy())
