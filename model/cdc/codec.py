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
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import entropy, exact
from ..bitstream import BitstreamError, Header, read_varint, varint
from ..codec import MAX_STEPS, Codec, Latents
from ..images import as_rgb8
from ..registry import Weights
from .exact_parts import CodePass, ExactContext, ExactHyperDecoder
from .config import CDCConfig
from .model import STRIDE, CDCModel

#: parameters only training needs (the stream's tables come from their exact integer export)
TRAINING_ONLY = ("h_s.", "z_density.")

DEFAULT_SEED = 0
#: padded pixels per network call when encoding or synthesizing a batch (bounds memory: ~24
#: 768x512 photos; the content decoder's activations take ~0.2 KB a pixel in float32)
BATCH_PIXELS = 1 << 23
#: ... on a CPU: one image a call. Measured one thread, Intel Xeon (AMX): 0-step synthesis of
#: 768x512 photos 0.38 s an image alone, 0.57 in batches (benchmarks/decode_split.py), of 256x256
#: crops 56 ms alone, 70 ms four at a time, 68 all at once; encoding 84 vs 93-99 ms (the
#: activations of a batch fall out of the caches)
CPU_BATCH_PIXELS = 0
_CRC = struct.Struct(">I")
_PARAMS = struct.Struct(">B")  # rate point


@dataclass(frozen=True)
class CDCLatents(Latents):
    """One CDC stream's exact half: y-hat (M x H/16 x W/16 float32, from exact integers) and its
    rate point; 4 bytes per element, 3 bytes per padded pixel (the size of the uint8 image)."""

    rate: int
    y_hat: np.ndarray


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
        """Encode images: the float analysis runs batched over images of one padded shape, the
        exact part and the entropy coding per image (streams as if encoded one at a time)."""
        imgs = [as_rgb8(img) for img in imgs]
        out = []
        with self.float_numerics():
            for img, analysed in zip(imgs, self._analysis(imgs)):
                z, k, y_parts = self._exact_symbols(*analysed)
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
        with self.float_numerics():  # as compress_batch: no autograd graph through the networks
            z, k, _ = self._exact_symbols(*self._analysis([as_rgb8(img)])[0])
        return z, k

    def _analysis(self, imgs: Sequence[np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The float analysis (g_a, the rate's gains, h_a) of each image: (y, h_a(y)), each with a
        batch dimension of 1. Images of one padded shape go through the networks together, at
        most BATCH_PIXELS padded pixels a call (one image a call on a CPU: CPU_BATCH_PIXELS)."""
        rate = torch.tensor([self.rate], device=self.device)
        gain = self.model.gains(rate)[0].double()
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(imgs)
        for group in _buckets([_padded(*img.shape[:2]) for img in imgs], self._batch_pixels):
            x = torch.cat([self._to_padded_tensor(imgs[i]) for i in group])
            y = self.model.g_a(x).double() * gain
            hyper = self.model.h_a(y.float()).double()
            for j, i in enumerate(group):
                out[i] = y[j:j + 1], hyper[j:j + 1]
        return out

    def _exact_symbols(self, y: torch.Tensor, hyper: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(z, k, the y chunk's parts as (symbols, table levels) in coding order) from one image's
        analysis: rounding, the exact hyper-synthesis (and context passes), clamping."""
        z = torch.round(hyper)
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
                         seed: int | None = DEFAULT_SEED, autocast: torch.dtype | None = None) -> list[np.ndarray]:
        """Decode streams: `steps` = 0 gives the mean image; > 0, that many DDIM steps; `autocast`
        the content decoder's precision (see synthesize_tensors)."""
        self._check_steps(steps)
        return self.synthesize(self.decode_latents(datas), steps, stochastic=stochastic, seed=seed, autocast=autocast)

    def decode_latents(self, datas: Sequence[bytes]) -> list[CDCLatents]:
        """Entropy decoding and the exact hyper-synthesis: y-hat of each stream, exact everywhere."""
        latents = []
        with torch.inference_mode():
            for data in datas:
                header, rate, y_hat = self._decode_latents(data)
                # float32 is what the content decoder takes: the correctly rounded y-hat, the same everywhere
                latents.append(CDCLatents(**self.latents_header(header), rate=rate,
                                          y_hat=y_hat[0].float().cpu().numpy()))
        return latents

    def synthesize_tensors(self, latents: Sequence[CDCLatents], steps: int | None = None, stochastic: bool = False,
                           seed: int | None = DEFAULT_SEED, autocast: torch.dtype | None = None,
                           channels_last: bool = True) -> list[torch.Tensor]:
        """The content decoder and, for steps > 0, DDIM steps, batched over latents of one padded
        shape (at most BATCH_PIXELS padded pixels a call; on a CPU one image, CPU_BATCH_PIXELS) on
        self.device: 3xHxW uint8 tensors.

        Deterministic decoding (eta = 0) starts from noise drawn with `seed`; `stochastic=True`
        uses eta = 1 with fresh noise at every step: the texture changes with the seed, and
        `seed=None` draws a new one each call. Noise comes from an integer generator, the
        same on every machine, drawn per image: an image gets the same noise alone or in a batch.
        `autocast` (torch.bfloat16 / torch.float16) runs the content decoder in that precision:
        not bit-exact (within 2 levels, tests.test_decode_split), off by default. `channels_last`
        is the content decoder's memory layout, on by default: on an Intel Xeon (AMX, one thread)
        it took the 0-step synthesis of a 768x512 photo from 0.65 to 0.38 s, the same pixels on
        all 12 dev photos (contiguous tensors make oneDNN reorder at every layer); bf16 with it
        0.10 s.
        """
        steps = self._check_steps(steps)
        self.check_latents(latents, CDCLatents)
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (1 << 32))
        images: list[torch.Tensor | None] = [None] * len(latents)
        with self.float_numerics():
            for group in _buckets([_padded(item.height, item.width) for item in latents], self._batch_pixels):
                y_hat = torch.from_numpy(np.stack([latents[i].y_hat for i in group])).to(self.device)
                if channels_last:
                    y_hat = y_hat.contiguous(memory_format=torch.channels_last)
                rates = torch.tensor([latents[i].rate for i in group], device=self.device)
                # autocast only where it was measured within PIXEL_BOUND: the content decoder (<= 2 levels
                # in bf16 on a CPU); the UNet's steps in bf16 moved pixels by 6 levels
                with torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
                    x_mean, features = self.model.decode_content(y_hat, rates)
                x = x_mean.float()
                if steps:  # (at 0 steps the features are not needed: converting them took 40% of the time)
                    # the UNet's steps take contiguous tensors: under channels_last oneDNN picked kernels by
                    # batch size, and an image's pixels changed with its batch (tests.test_decode_split)
                    x = self._sample(x.contiguous(), [f.float().contiguous() for f in features], steps, stochastic,
                                     seed)
                for j, i in enumerate(group):
                    images[i] = _to_uint8(x[j, :, :latents[i].height, :latents[i].width])
        return images

    @property
    def _batch_pixels(self) -> int:
        return CPU_BATCH_PIXELS if self.device.type == "cpu" else BATCH_PIXELS

    def _check_steps(self, steps: int | None) -> int:
        steps = self.default_steps if steps is None else steps
        if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be an integer in 0..{MAX_STEPS}, got {steps!r}")
        return steps

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
            # every image of the batch draws the noise it would draw alone
            draw, count = next(draws), int(np.prod(size[1:]))
            values = np.stack([exact.normal_noise(seed, draw, count) for _ in range(size[0])]) * exact.NOISE_SCALE
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


def _buckets(padded: Sequence[tuple[int, int]], batch_pixels: int) -> list[list[int]]:
    """Indices of images of one padded shape, in groups of at most `batch_pixels` padded pixels (one at least).
    Images of one shape run through the networks together exactly as each would alone (tested);
    padding them to a common shape would not (their borders would see other images' padding)."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, shape in enumerate(padded):
        by_shape.setdefault(shape, []).append(i)
    groups = []
    for (height, width), members in by_shape.items():
        size = max(1, batch_pixels // (height * width))
        groups += [members[start:start + size] for start in range(0, len(members), size)]
    return groups


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, on x's device (two correctly rounded ops: the same on CPU and GPU)."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
