"""The CDC codec: hyperprior latents written with rANS, decoded by a conditional diffusion UNet.

Stream layout (inside the model.bitstream container): chunk 0 is the rANS string of the
hyper-latent z, chunk 1 that of the latent y. The image is padded (edge replication) to a
multiple of 64, so the latent shapes follow from the header's image size; `params` is empty.

    codec = load_codec("cdc-small-b0040")
    data = codec.compress(img)
    img2 = codec.decompress(data, steps=4)                      # deterministic DDIM
    img3 = codec.decompress(data, stochastic=True, seed=7)      # DDIM with eta = 1
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..bitstream import BitstreamError
from ..codec import Codec
from ..images import as_rgb8
from ..registry import Weights
from .config import CDCConfig
from .model import STRIDE, CDCModel, EncodedLatents

MAX_STEPS = 1000
DEFAULT_SEED = 0


class CDCCodec(Codec):
    family = "cdc"

    def __init__(self, weights: Weights, device: str | torch.device | None = None):
        super().__init__(weights, device)
        self.model = CDCModel(CDCConfig.from_dict(weights.config))
        # Weights may be stored in half precision to keep files small; networks run in float32.
        self.model.load_weight_tensors({k: v.float() for k, v in weights.tensors.items()})
        self.model.eval().to(self.device)
        with self.pinned_numerics():
            self.model.build_entropy_tables()
        self.default_steps = int(self.model.config.default_steps)

    # ----- encoding ------------------------------------------------------------------------
    def compress_batch(self, imgs: Sequence[np.ndarray]) -> list[bytes]:
        return [self.pack(img.shape[0], img.shape[1], [latents.z_string, latents.y_string])
                for img, latents in zip(map(as_rgb8, imgs), self.encode_latents(imgs))]

    def encode_latents(self, imgs: Sequence[np.ndarray]) -> list[EncodedLatents]:
        """Quantized latents and their rANS strings for each image (exposed for tests and rate studies)."""
        out = []
        with self.pinned_numerics():
            for img in map(as_rgb8, imgs):
                y = self.model.analysis(self._to_padded_tensor(img))
                out.append(self.model.encode_latents(y))
        return out

    def estimated_bits(self, img: np.ndarray) -> float:
        """The entropy model's -log2 likelihood of the image's quantized latents."""
        return self.encode_latents([img])[0].estimated_bits

    # ----- decoding ------------------------------------------------------------------------
    def decompress_batch(self, datas: Sequence[bytes], steps: int | None = None,
                         stochastic: bool = False, seed: int | None = DEFAULT_SEED) -> list[np.ndarray]:
        """Decode streams with `steps` DDIM steps (default: the config's).

        Deterministic decoding (eta = 0) starts from noise drawn with `seed`; `stochastic=True`
        uses eta = 1, drawing fresh noise at every step from the same generator: the texture
        changes with the seed, and `seed=None` draws a new one each call.
        Streams are decoded one at a time, so a stream's pixels never depend on which other
        streams share its batch (batched convolutions may round differently).
        """
        steps = self.default_steps if steps is None else steps
        if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
        images = []
        with self.pinned_numerics():
            for data in datas:
                height, width, y_hat = self._decode_latents(data)
                generator = torch.Generator()
                if seed is None:
                    generator.seed()
                else:
                    generator.manual_seed(seed)
                noise = torch.randn((1, 3, *self._padded(height, width)), generator=generator)
                context = self.model.conditioning(y_hat)
                x0 = self.model.sample(context, noise.to(self.device), steps,
                                       eta=1.0 if stochastic else 0.0, generator=generator)
                images.append(self._to_uint8(x0[0, :, :height, :width]))
        return images

    def decode_symbols(self, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        """The (z, y) integer symbols stored in a stream, read back through rANS."""
        header, chunks = self._checked_chunks(data)
        with self.pinned_numerics():
            z_symbols, y_symbols, _ = self._entropy_decode(header.height, header.width, chunks)
        return z_symbols, y_symbols

    def _decode_latents(self, data: bytes) -> tuple[int, int, torch.Tensor]:
        header, chunks = self._checked_chunks(data)
        _, _, y_hat = self._entropy_decode(header.height, header.width, chunks)
        return header.height, header.width, y_hat

    def _checked_chunks(self, data: bytes):
        header, chunks = self.unpack(data)
        if len(chunks) != 2 or header.params:
            raise BitstreamError(f"a CDC stream has 2 chunks and no params; this one has "
                                 f"{len(chunks)} chunks and {len(header.params)} param bytes")
        return header, chunks

    def _entropy_decode(self, height: int, width: int, chunks: list[bytes]):
        ph, pw = self._padded(height, width)
        z_shape = (1, self.model.config.hyper_channels, ph // STRIDE, pw // STRIDE)
        try:
            return self.model.decode_latents(chunks[0], chunks[1], z_shape)
        except (RuntimeError, ValueError, IndexError, OverflowError) as exc:
            # compressai signals malformed strings with assorted exception types.
            raise BitstreamError(f"cannot entropy-decode the CDC latents: {exc}") from exc

    # ----- pixels <-> tensors ----------------------------------------------------------------
    @staticmethod
    def _padded(height: int, width: int) -> tuple[int, int]:
        return -(-height // STRIDE) * STRIDE, -(-width // STRIDE) * STRIDE

    def _to_padded_tensor(self, img: np.ndarray) -> torch.Tensor:
        height, width = img.shape[:2]
        x = torch.tensor(img).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
        ph, pw = self._padded(height, width)
        # Edge replication: unlike reflection it works for 1-pixel images and adds no texture.
        return F.pad(x, (0, pw - width, 0, ph - height), mode="replicate").to(self.device)

    @staticmethod
    def _to_uint8(x: torch.Tensor) -> np.ndarray:
        pixels = ((x.float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return np.ascontiguousarray(pixels.permute(1, 2, 0).numpy())
