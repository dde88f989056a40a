"""Turning image files and arrays into the HxWx3 uint8 arrays every codec takes.

Every conversion is explicit and reported: callers get back a short note of what was
done (e.g. "I;16->RGB (16-bit scaled to 8-bit)") so a manifest can record it.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps

# Refuse images whose header claims more pixels than this before decoding them
# (decompression bombs); larger photos than this are not a use case.
MAX_DECODED_PIXELS = 120_000_000


class ImageDecodeError(ValueError):
    """An input could not be turned into an RGB image. `category` is a short, fixed name for
    the kind of failure (to count by); the message is "category: detail"."""

    def __init__(self, category: str, detail: str = ""):
        super().__init__(f"{category}: {detail}" if detail else category)
        self.category = category


def as_rgb8(img: np.ndarray) -> np.ndarray:
    """Validate an array for a codec: HxWx3 uint8, or gray (HxW / HxWx1) replicated to RGB.

    Anything else (alpha, 16-bit, float) raises: convert it with `decode_image` or
    `to_rgb8` first, so that no conversion happens silently.
    """
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise ValueError(f"codecs take uint8 pixels, got {arr.dtype}; convert with model.images.to_rgb8")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"codecs take HxWx3 RGB arrays, got shape {arr.shape}; "
                         "convert RGBA or other layouts with model.images.to_rgb8")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"empty image of shape {arr.shape}")
    return np.ascontiguousarray(arr)


def to_rgb8(image: Image.Image) -> tuple[np.ndarray, str]:
    """Convert any PIL image to HxWx3 uint8; returns the array and a note of the conversion."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy(), "RGB"
    if mode in ("L", "1"):
        return as_rgb8(np.asarray(image.convert("L"))), f"{mode}->RGB (gray replicated)"
    if mode == "F":
        raise ImageDecodeError("unsupported pixel format",
                               "floating-point images are not supported; export them as 8 or 16-bit")
    if mode.startswith("I"):
        return _high_depth_gray(image), f"{mode}->RGB (16-bit gray scaled to 8-bit)"
    if mode == "P":
        has_alpha = "transparency" in image.info
        image, mode = image.convert("RGBA" if has_alpha else "RGB"), f"P->{'RGBA' if has_alpha else 'RGB'}"
        if not has_alpha:
            return np.asarray(image).copy(), f"{mode} (palette expanded)"
    if mode in ("LA", "La"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa"):
        rgba = np.asarray(image.convert("RGBA"))
        alpha = rgba[:, :, 3:].astype(np.float32) / 255.0
        if np.all(rgba[:, :, 3] == 255):
            return rgba[:, :, :3].copy(), f"{mode}->RGB (opaque alpha dropped)"
        on_white = rgba[:, :, :3] * alpha + 255.0 * (1.0 - alpha)
        return np.round(on_white).astype(np.uint8), f"{mode}->RGB (alpha composited on white)"
    return np.asarray(image.convert("RGB")).copy(), f"{mode}->RGB"


def decode_image(data: bytes) -> tuple[np.ndarray, str]:
    """Decode encoded image bytes (PNG, JPEG, WebP, ...) to HxWx3 uint8 and a conversion note.

    The note says only what was done: the conversion to RGB, "(EXIF orientation N applied)"
    when an Orientation tag other than 1 turned the image, "(first of N frames)" for an
    animation or a multi-page file, of which only the first frame is kept.
    Raises ImageDecodeError with the reason for empty, corrupt, truncated or oversized inputs.
    """
    if not data:
        raise ImageDecodeError("empty file (zero bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > MAX_DECODED_PIXELS:
                    raise ImageDecodeError("decompression bomb",
                                           f"{width}x{height} exceeds {MAX_DECODED_PIXELS} pixels")
                frames = getattr(image, "n_frames", 1)
                image.load()
                # Pillow 13 returns a copy from exif_transpose even when it turns nothing, so
                # whether the image was turned is read from the Orientation tag itself.
                orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
                turned = orientation in range(2, 9)
                profile = image.info.get("icc_profile")
                array, note = to_rgb8(ImageOps.exif_transpose(image) if turned else image)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("decompression bomb", str(exc)) from exc
    except Exception as exc:  # Pillow raises many types for bad data; all mean "not an image"
        raise ImageDecodeError("cannot decode image", f"{type(exc).__name__}: {exc}") from exc
    if profile:
        array, icc_note = _to_srgb(array, profile)
        note += icc_note
    if turned:
        note += f" (EXIF orientation {orientation} applied)"
    if frames > 1:
        note += f" (first of {frames} frames)"
    return array, note


def _to_srgb(array: np.ndarray, profile: bytes) -> tuple[np.ndarray, str]:
    """Pixels in an embedded RGB ICC profile converted to sRGB (the codecs' and viewers' colour
    space), with a note; an sRGB profile (conversion within one level) changes nothing, a
    profile of another colour space or an unreadable one is named and not applied."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        name = ImageCms.getProfileDescription(source).strip() or "unnamed"
        if source.profile.xcolor_space.strip() != "RGB":
            return array, f" (ICC profile {name!r} of {source.profile.xcolor_space.strip()} not applied)"
        converted = np.asarray(ImageCms.profileToProfile(
            Image.fromarray(array), source, ImageCms.createProfile("sRGB"),
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC, outputMode="RGB"))
    except (ImageCms.PyCMSError, OSError, ValueError) as exc:
        return array, f" (unreadable ICC profile not applied: {exc})"
    if np.abs(converted.astype(np.int16) - array).max() <= 1:
        return array, ""
    return converted.copy(), f" (ICC profile {name!r} converted to sRGB)"


def encode_png(img: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(as_rgb8(img)).save(out, format="PNG")
    return out.getvalue()


def _high_depth_gray(image: Image.Image) -> np.ndarray:
    values = np.asarray(image, dtype=np.float64)
    return as_rgb8(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8))
