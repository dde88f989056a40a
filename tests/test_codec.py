"""The Codec base class: float numerics leave the process's settings as they found them."""

from __future__ import annotations

import pytest
import torch

from model import Codec
from model.registry import Weights


class NullCodec(Codec):
    family = "null"

    def compress_batch(self, imgs):
        return []

    def decompress_batch(self, datas, steps=None, **options):
        return []

    def decode_latents(self, datas, **options):
        return []

    def synthesize_tensors(self, latents, steps=None, **options):
        return []


def settings() -> tuple:
    return (torch.get_num_threads(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


@pytest.fixture
def unusual_settings():
    """Settings a user may have chosen, unlike what float_numerics sets; the originals come back after."""
    original = settings()
    torch.set_num_threads(3)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
    yield settings()
    torch.set_num_threads(original[0])
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = original[1:]


# A "cuda" codec only changes flags here (nothing runs), so the GPU branch is testable on a CPU.
@pytest.mark.parametrize("device,inside", [("cpu", (3, False, True, True, True)),
                                           ("cuda", (3, True, False, False, False))])
def test_float_numerics_restores_every_setting_it_changes(unusual_settings, device, inside):
    codec = NullCodec(Weights("null", "null", {}, {}), device=device)
    assert unusual_settings == (3, False, True, True, True)
    with codec.float_numerics():
        assert settings() == inside
        assert torch.is_inference_mode_enabled()
    assert settings() == unusual_settings
    with pytest.raises(RuntimeError, match="boom"):
        with codec.float_numerics():
            assert settings() == inside
            raise RuntimeError("boom")
    assert settings() == unusual_settings
