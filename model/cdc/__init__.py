"""CDC: "Lossy Image Compression with Conditional Diffusion Models" (Yang & Mandt, NeurIPS 2023).

    config   CDCConfig (network sizes, stored in weights files; PRESETS "small", "paper"),
             TrainConfig (one training run)
    nets     the networks: analysis/hyper transforms, conditioning decoder, denoising UNet
    model    CDCModel: hyperprior entropy model with rANS (compressai), training loss, DDIM sampling
    codec    CDCCodec: the Codec (stream layout, padding, decode options steps/stochastic/seed)
    train    the training loop, checkpoints, export to a weights file, the Ray Train driver (fit)

Where a change goes: network shapes in nets (and config if it needs a size); what is coded
or how it is sampled in model; the stream layout in codec; optimisation in train.
"""

import warnings

# compressai imports torch_geometric, whose import calls torch.jit.script, deprecated in the pinned
# torch: a FutureWarning about code that is not ours, printed by every process that loads
# CDC (each Ray actor, `--help`). Imported here first, under a filter for that message only, so
# the networks' own `import compressai...` find it loaded and a user's own warnings still show.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    import compressai  # noqa: F401

from .codec import CDCCodec  # noqa: E402

__all__ = ["CDCCodec"]
