"""UQDM: progressive coding with a universally quantized diffusion model, exact on every machine.

From "Progressive Compression with Universally Quantized Diffusion Models" (Yang, Will &
Mandt, ICLR 2025). The forward process adds uniform noise; each of the T reverse steps is
sent with universal quantization: with a dither u ~ U(-1/2, 1/2) shared through a seed,

    k = round((mu_q - mu_p) / delta + u),    z_s = mu_p + (k - u) * delta,

and k is entropy coded under the prior p(z_s | z_t) = logistic(mu_p, scale) * U(delta),
whose probability for k given u is exactly

    P(k | u) = sigmoid((k - u + 1/2) / r) - sigmoid((k - u - 1/2) / r),  r = scale / delta.

So the coded size equals the model's negative ELBO up to the coder's overhead. A final
lossless chunk codes the pixels under p(x | z_0). Stream = T + 1 chunks; any prefix
decodes: after n < T chunks the image is the network's denoised guess from z_{t_n}.

Exactness (see `model.exact`): the network is the integer network of `int_net`; the
latents live on a 2^-12 grid, the dither on a 2^-8 grid, 1/r in 16-bit fixed point; the
step constants are float64 numbers stored in the weights file; P(k | u) and p(x | z_0)
come from integer tables. So every machine computes the same tables, for any batch size
and thread count, on CPU or GPU: a stream decodes wherever it was written.

Images are cut into 64x64 tiles (edge-padded; the model was trained on 64x64 images with
global attention). Tiles are framed in segments of `tile_batch` tiles (a stream
parameter; it bounds the work before a damaged segment is caught). Padding is never
coded: its symbols are fixed to k = 0 on both sides.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .. import entropy, exact
from ..bitstream import BitstreamError
from ..codec import Codec, DecodedPixels
from ..images import as_rgb8
from ..registry import Weights
from .int_net import Z_EXPONENT, IntScoreNet

TILE = 64
Z_ONE = float(1 << Z_EXPONENT)
U_BITS = 8                        # the dither's grid: 2^-8
U_UNIT = 1 << (U_BITS + 1)        # dither integers are odd multiples of 2^-9
INV_R_BITS = 16                   # 1/r in fixed point
_ARG_BITS = U_BITS + 1 + INV_R_BITS
_PARAMS = struct.Struct(">HHI")   # tile size, tiles per segment, dither seed
_CRC = struct.Struct(">I")
_MAX_TILE_BATCH = 64              # bounds the work done before a hostile stream is caught
_STREAMS_PER_TILE = 64            # random streams: tile * 64 + (0: initial latent, 1..T: dithers)


@dataclass(frozen=True)
class StepConstants:
    """float64 constants of one reverse step t -> s, computed once at import and stored."""
    loc_scale: float    # alpha_s / alpha_t
    eps_scale: float    # sigma_t * expm1, expm1 = sigma_{t|s}^2 / sigma_t^2
    prior_scale: float  # r per unit of the softplus integer: sigma_t sqrt(expm1) (sqrt 3 / pi) / delta / 2^16
    delta: float
    inv_delta: float
    q_z: float          # alpha_s (1 - expm1) / alpha_t
    q_x: float          # alpha_s expm1
    inv_alpha_t: float
    sigma_t: float


@dataclass(frozen=True)
class PixelConstants:
    """p(x | z_0): centre = z * centre_scale + 127.5; density index = squared offset * density."""
    centre_scale: float  # 128 / (2^12 alpha_0)
    inv_alpha_0: float
    density: float       # 0.5 * exp(-gamma_0) / 128^2 * 2^-8


class UQDMCodec(Codec):
    family = "uqdm"
    progressive = True

    def __init__(self, weights: Weights, device: str | torch.device | None = None,
                 tile_batch: int | None = None, seed: int = 0):
        super().__init__(weights, device)
        net = {k[len("net."):]: v for k, v in weights.tensors.items() if k.startswith("net.")}
        self.net = IntScoreNet(net, weights.config, self.device)
        self.steps = [StepConstants(*row) for row in weights.tensors["schedule"].tolist()]
        self.pixel = PixelConstants(*weights.tensors["pixel"].tolist())
        self.n_steps = len(self.steps)
        self.tile_batch = tile_batch or (4 if self.device.type == "cpu" else 32)
        if not 0 < self.tile_batch <= _MAX_TILE_BATCH:
            raise ValueError(f"tile_batch must be 1..{_MAX_TILE_BATCH}")
        self.seed = seed

    @property
    def n_chunks(self) -> int:
        return self.n_steps + 1

    # ------------------------------------------------------------------ encode
    def compress_batch(self, imgs: Sequence[np.ndarray]) -> list[bytes]:
        return [self.compress_with_rates(img)[0] for img in imgs]

    def compress_with_rates(self, img: np.ndarray) -> tuple[bytes, list[float]]:
        """Encode one image; also return the ideal bits per chunk (the model's negative ELBO terms)."""
        img = as_rgb8(img)
        height, width = img.shape[:2]
        tiles = _tile(img)
        segments: list[list[bytes]] = [[] for _ in range(self.n_chunks)]
        ideal_bits = [0.0] * self.n_chunks
        with torch.inference_mode():
            for first, last in _groups(len(tiles), self.tile_batch):
                x_raw = torch.from_numpy(tiles[first:last]).to(self.device)
                m = torch.from_numpy(_group_mask(height, width, first, last)).to(self.device)
                x = (x_raw.double() + 0.5) * (1.0 / 128) - 1.0
                z = self._initial_latent(first, last)
                for i, step in enumerate(self.steps):
                    p_loc, _, inv_r = self._prior(z, i)
                    dither = self._dither(first, last, i)
                    u = dither * (1.0 / U_UNIT)
                    q_loc = z * (step.q_z / Z_ONE) + x * step.q_x
                    k = torch.round((q_loc - p_loc) * step.inv_delta + u) * m
                    z = _next_latent(p_loc, k, u, step)
                    symbols = k[m].long().cpu().numpy()
                    segment, bits = _encode_segment(symbols, _uq_rows(dither, inv_r, m), checked=symbols)
                    segments[i].append(segment)
                    ideal_bits[i] += bits
                centre, rows = self._pixel_model(z, m)
                pixels = x_raw[m].long().cpu().numpy()
                segment, bits = _encode_segment(pixels - centre, rows, checked=pixels)
                segments[-1].append(segment)
                ideal_bits[-1] += bits
        chunks = [entropy.join_segments(segs) for segs in segments]
        return self.pack(height, width, chunks, _PARAMS.pack(TILE, self.tile_batch, self.seed)), ideal_bits

    # ------------------------------------------------------------------ decode
    def decompress_batch(self, datas: Sequence[bytes], steps: int | None = None,
                         chunks: int | None = None) -> list[np.ndarray]:
        """Decode streams. `chunks` is the prefix to use: 1..T diffusion steps, T+1 = lossless (default).

        A stream cut after the n-th chunk decodes with chunks <= n.
        """
        self._refuse_steps(steps)
        return self.synthesize(self.decode_latents(datas, chunks))

    def decode_latents(self, datas: Sequence[bytes], chunks: int | None = None) -> list[DecodedPixels]:
        """UQDM is exact to the last pixel, so its exact half is the whole decode (on self.device)."""
        return [self._decode(data, chunks) for data in datas]

    def synthesize_tensors(self, latents: Sequence[DecodedPixels], steps: int | None = None) -> list[torch.Tensor]:
        """The decoded pixels as 3xHxW tensors on self.device: nothing is left to synthesize."""
        self._refuse_steps(steps)
        self.check_latents(latents, DecodedPixels)
        return [torch.from_numpy(item.pixels).permute(2, 0, 1).to(self.device) for item in latents]

    def _refuse_steps(self, steps: int | None) -> None:
        if steps is not None:
            raise ValueError("UQDM spends one diffusion step per chunk: choose the prefix with chunks=N "
                             f"(1..{self.n_steps} steps, {self.n_chunks} = lossless), not steps")

    def _decode(self, data: bytes, n_chunks: int | None) -> DecodedPixels:
        header, chunks = self.unpack(data, n_chunks)
        if len(header.chunk_lengths) != self.n_chunks:
            raise BitstreamError(f"UQDM stream has {len(header.chunk_lengths)} chunks; this model writes {self.n_chunks}")
        tile_batch, seed = _read_params(header.params)
        height, width = header.height, header.width
        rows, cols = _grid(height, width)
        groups = list(_groups(rows * cols, tile_batch))
        # Check every chunk's framing before any network runs or any image is allocated.
        segments = [entropy.split_segments(chunk, len(groups)) for chunk in chunks]
        out = np.zeros((rows * cols, 3, TILE, TILE), dtype=np.uint8)
        with torch.inference_mode():
            for g, (first, last) in enumerate(groups):
                m = torch.from_numpy(_group_mask(height, width, first, last)).to(self.device)
                z = self._initial_latent(first, last, seed)
                for i, step in enumerate(self.steps[:len(chunks)]):
                    p_loc, _, inv_r = self._prior(z, i)
                    dither = self._dither(first, last, i, seed)
                    symbols = _decode_segment(segments[i][g], _uq_rows(dither, inv_r, m), m, i, lambda s: s)
                    k = torch.zeros_like(z)
                    k[m] = torch.from_numpy(symbols).to(k)
                    z = _next_latent(p_loc, k, dither * (1.0 / U_UNIT), step)
                lossless = segments[-1][g] if len(chunks) == self.n_chunks else None
                out[first:last] = self._reconstruct(z, m, len(chunks), lossless).cpu().numpy()
        return DecodedPixels(**self.latents_header(header), pixels=_untile(out, height, width))

    def _reconstruct(self, z: torch.Tensor, m: torch.Tensor, n_chunks: int,
                     lossless: bytes | None) -> torch.Tensor:
        if n_chunks < self.n_steps:  # denoise: the network's guess of x from z_t
            step = self.steps[n_chunks]
            _, eps, _ = self._prior(z, n_chunks)
            x_hat = ((z * (1.0 / Z_ONE) - eps * step.sigma_t) * step.inv_alpha_t).clamp_(-1, 1)
            return _to_pixels(x_hat * self.pixel.inv_alpha_0)
        if lossless is None:  # argmax of p(x | z_0)
            return _to_pixels(z * (self.pixel.inv_alpha_0 / Z_ONE))
        centre, rows = self._pixel_model(z, m)
        pixels = _decode_segment(lossless, rows, m, n_chunks - 1, lambda offsets: np.clip(centre + offsets, 0, 255))
        x = torch.zeros(m.shape, dtype=torch.uint8, device=self.device)
        x[m] = torch.from_numpy(pixels.astype(np.uint8)).to(self.device)
        return x

    # ------------------------------------------------------------------ model pieces
    def _prior(self, z: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(location of p(z_s | z_t), the predicted noise, 1/r in fixed point) for integer latents z."""
        step = self.steps[i]
        eps_raw, softplus = self.net(z, i)
        z_real = z * (1.0 / Z_ONE)
        eps = eps_raw * float(2.0 ** -self.net.e("out.eps", i)) + z_real
        p_loc = (z_real - eps * step.eps_scale) * step.loc_scale
        r = softplus * step.prior_scale
        inv_r = torch.round(torch.full_like(r, float(1 << INV_R_BITS)) / r).clamp_(1, 1 << 24)
        return p_loc, eps, inv_r

    def _pixel_model(self, z_0: torch.Tensor, m: torch.Tensor) -> tuple[np.ndarray, entropy.FrequencyRows]:
        """p(x | z_0) (VDM's decoder): integer centres and integer frequency rows over offsets."""
        centre_fixed = torch.round((z_0 * self.pixel.centre_scale + 127.5) * 256.0)[m].long().cpu().numpy()
        centre = np.clip((centre_fixed + 128) >> 8, 0, 255)
        density = self.pixel.density

        def rows(window: int) -> np.ndarray:
            values = centre[:, None] + np.arange(-window, window + 1)[None, :]
            squared = (256 * values - centre_fixed[:, None]) ** 2
            weights = exact.exp_fixed(np.round(squared * density).astype(np.int64))
            return exact.frequency_rows(np.where((values >= 0) & (values <= 255), weights, 0))

        return centre, rows

    def _initial_latent(self, first: int, last: int, seed: int | None = None) -> torch.Tensor:
        seed = self.seed if seed is None else seed
        count = 3 * TILE * TILE
        noise = [exact.normal_noise(seed, tile * _STREAMS_PER_TILE, count) for tile in range(first, last)]
        return torch.from_numpy(np.stack(noise).reshape(-1, 3, TILE, TILE)).to(self.device, torch.float64)

    def _dither(self, first: int, last: int, i: int, seed: int | None = None) -> torch.Tensor:
        seed = self.seed if seed is None else seed
        count = 3 * TILE * TILE
        u = [exact.dither(seed, tile * _STREAMS_PER_TILE + i + 1, count, U_BITS) for tile in range(first, last)]
        return torch.from_numpy(np.stack(u).reshape(-1, 3, TILE, TILE)).to(self.device, torch.float64)


# ---------------------------------------------------------------------- helpers
def _next_latent(p_loc: torch.Tensor, k: torch.Tensor, u: torch.Tensor, step: StepConstants) -> torch.Tensor:
    """z_s = p_loc + (k - u) delta, on the latents' 2^-12 grid (as integers)."""
    return torch.round((p_loc + (k - u) * step.delta) * Z_ONE).clamp_(-exact.INT16, exact.INT16)


def _uq_rows(dither: torch.Tensor, inv_r: torch.Tensor, m: torch.Tensor) -> entropy.FrequencyRows:
    """P(k | u) of universal quantization under a logistic of scale r, as integer frequency rows."""
    u = dither[m].long().cpu().numpy()[:, None]
    inv = inv_r[m].long().cpu().numpy()[:, None]
    half = U_UNIT // 2

    def rows(window: int) -> np.ndarray:
        centre = np.arange(-window, window + 1, dtype=np.int64)[None, :] * U_UNIT - u
        upper = exact.sigmoid_fixed((centre + half) * inv, _ARG_BITS)
        lower = exact.sigmoid_fixed((centre - half) * inv, _ARG_BITS)
        return exact.frequency_rows(upper - lower)

    return rows


def _to_pixels(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1.0) * 128.0 - 0.5).round_().clamp_(0, 255).to(torch.uint8)


def _groups(n_tiles: int, tile_batch: int):
    """Tiles are framed in segments of `tile_batch` tiles."""
    for first in range(0, n_tiles, tile_batch):
        yield first, min(first + tile_batch, n_tiles)


def _encode_segment(offsets: np.ndarray, rows: entropy.FrequencyRows, checked: np.ndarray) -> tuple[bytes, float]:
    """A CRC of what the decoder must reproduce, then the entropy-coded offsets; and their ideal bits."""
    used = {}

    def remembered(window: int) -> np.ndarray:
        used["window"], used["rows"] = window, rows(window)
        return used["rows"]

    segment = _CRC.pack(zlib.crc32(checked.astype("<i4").tobytes())) + entropy.encode_offsets(offsets, remembered)
    if not offsets.size:
        return segment, 0.0
    return segment, entropy.ideal_bits(used["rows"], offsets, used["window"])


def _decode_segment(segment: bytes, rows: entropy.FrequencyRows, m: torch.Tensor, chunk: int,
                    finish) -> np.ndarray:
    """Decode one segment, turn offsets into the checked values with `finish`, verify the CRC."""
    if len(segment) < _CRC.size:
        raise BitstreamError("UQDM segment too short")
    values = finish(entropy.decode_offsets(segment[_CRC.size:], int(m.sum()), rows))
    if zlib.crc32(values.astype("<i4").tobytes()) != _CRC.unpack_from(segment)[0]:
        raise BitstreamError(f"chunk {chunk} decoded to other values than were encoded: the stream is corrupt")
    return values


def _read_params(params: bytes) -> tuple[int, int]:
    if len(params) != _PARAMS.size:
        raise BitstreamError("corrupt UQDM parameters")
    tile, tile_batch, seed = _PARAMS.unpack(params)
    if tile != TILE or not 0 < tile_batch <= _MAX_TILE_BATCH:
        raise BitstreamError(f"unsupported UQDM tiling (tile {tile}, batch {tile_batch})")
    return tile_batch, seed


def _grid(height: int, width: int) -> tuple[int, int]:
    return -(-height // TILE), -(-width // TILE)


def _tile(img: np.ndarray) -> np.ndarray:
    """HxWx3 -> (N, 3, 64, 64) edge-padded tiles in row-major order."""
    height, width, _ = img.shape
    rows, cols = _grid(height, width)
    padded = np.pad(img, ((0, rows * TILE - height), (0, cols * TILE - width), (0, 0)), mode="edge")
    tiles = padded.reshape(rows, TILE, cols, TILE, 3).transpose(0, 2, 4, 1, 3).reshape(-1, 3, TILE, TILE)
    return np.ascontiguousarray(tiles)


def _group_mask(height: int, width: int, first: int, last: int) -> np.ndarray:
    """Which elements of tiles first..last-1 are real pixels (the rest is padding, never coded)."""
    cols = _grid(height, width)[1]
    mask = np.zeros((last - first, 3, TILE, TILE), dtype=bool)
    for j, tile in enumerate(range(first, last)):
        row, col = divmod(tile, cols)
        mask[j, :, :height - row * TILE, :width - col * TILE] = True
    return mask


def _untile(tiles: np.ndarray, height: int, width: int) -> np.ndarray:
    rows, cols = _grid(height, width)
    full = tiles.reshape(rows, cols, 3, TILE, TILE).transpose(0, 3, 1, 4, 2).reshape(rows * TILE, cols * TILE, 3)
    return np.ascontiguousarray(full[:height, :width])
