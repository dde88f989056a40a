"""CDC: "Lossy Image Compression with Conditional Diffusion Models" (Yang & Mandt, NeurIPS 2023).

    config         CDCConfig (network sizes, rate points, context groups, h_s widths; stored
                   in weights files; PRESETS "hp128", "paper"), TrainConfig (one training run)
    nets           the networks: analysis/hyper transforms, conditioning decoder, denoising UNet
    context        ContextModel: channel groups + checkerboard refining the hyperprior (ELIC-style)
    model          CDCModel: hyperprior entropy model, training loss, DDIM sampling
    exact_parts    the integer half: ExactChain (integer conv nets), ExactHyperDecoder,
                   ExactContext, the integer coding tables, and their export from float nets
    codec          CDCCodec: the Codec (stream layout, padding, decode options steps/stochastic/seed)
    train          the training loop, checkpoints, export to a weights file, the Ray Train driver (fit)
    frozen         training on a released model's frozen transforms: latent cache, restartable loop
    train_context  the context model trained that way
    train_hyper    a smaller hyperprior (h_a, h_s, z density) trained that way

Where a change goes: network shapes in nets/context (and config if it needs a size); what is
coded or how it is sampled in model; anything that decides a symbol in exact_parts; the stream
layout in codec; optimisation in train.
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
