"""Red team, round 3: hostile tar members, image edge cases and hostile weights files. Each
gets a clear error (or error row), loses nothing else, and never yields a silently wrong image.
(Hostile manifests and faults during a run are in test_read_archive.py and test_compress_local.py.)"""

from __future__ import annotations

import io
import struct
import tarfile
import time

import numpy as np
import pytest
from PIL import Image, ImageCms

from model import decode_image, load_codec
from model.images import ImageDecodeError
from model.registry import SHIPPED_DIR, Weights, read_weights, save_weights
from pipeline.shards import read_shard

from .pipeline_fixtures import good_sample, special_member, tar_of


def samples_and_errors(data: bytes) -> tuple[dict[str, list[str]], list[tuple[str, str, str]]]:
    contents = read_shard(data)
    return ({s.key: sorted(s.members) for s in contents.samples},
            [(e.key, e.member, e.category) for e in contents.errors])


# ---------------------------------------------------------------------- tar members
JPG = good_sample("a", 1).members["jpg"]
PNG = good_sample("b", 2).members["png"]


def test_devices_and_folders_named_like_images_are_not_images():
    samples, errors = samples_and_errors(tar_of([("a.jpg", JPG), special_member("c.jpg", tarfile.CHRTYPE),
                                                 special_member("x.jpg", tarfile.DIRTYPE), ("y.jpg", JPG)]))
    assert samples == {"a": ["jpg"], "c": [], "y": ["jpg"]}  # the folder is structure, not a sample
    assert errors == [("c", "jpg", "unsupported tar member")]


def test_a_pax_header_claiming_a_petabyte_is_refused_at_once():
    """It used to hang: tarfile skips a streamed member by reading up to its claimed size."""
    huge = tarfile.TarInfo("h.jpg")
    huge.size, huge.pax_headers = 0, {"size": str(10 ** 15)}
    started = time.monotonic()
    samples, errors = samples_and_errors(tar_of([("a.jpg", JPG), ("h.jpg", huge), ("z.jpg", JPG)], tarfile.PAX_FORMAT))
    assert time.monotonic() - started < 10
    assert samples == {"a": ["jpg"]}  # z lies inside the claimed bytes: the tar ends there
    assert errors == [("h", "jpg", "member too large"), ("h", "jpg", "truncated tar")]


def test_a_header_claiming_more_bytes_than_the_shard_has_is_a_truncated_tar():
    data = bytearray(tar_of([("a.jpg", JPG), ("b.jpg", JPG)]))
    second = 512 + -(-len(JPG) // 512) * 512  # b's header: after a's header and data
    assert data[second:second + 5] == b"b.jpg"
    data[second + 124:second + 136] = b"%011o\0" % (5 << 20)
    data[second + 148:second + 156] = b" " * 8
    data[second + 148:second + 156] = b"%06o\0 " % sum(data[second:second + 512])
    samples, errors = samples_and_errors(bytes(data))
    assert samples == {"a": ["jpg"]} and errors == [("b", "jpg", "truncated tar")]


def test_two_image_members_of_one_key_keep_the_first_as_image_and_the_second_as_an_extra():
    contents = read_shard(tar_of([("a.jpg", JPG), ("a.png", PNG), ("a.cls", b"3")]))
    [sample] = contents.samples
    assert sample.image_member == "jpg" and sample.extras == {"png": PNG, "cls": b"3"} and not contents.errors


# ---------------------------------------------------------------------- images
def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


RNG = np.random.default_rng(0)
RGB = Image.fromarray(RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8))
IMAGE_CASES = {
    "CMYK JPEG": (encoded(RGB.convert("CMYK"), "JPEG"), (20, 30), "CMYK->RGB"),
    "palette": (encoded(RGB.convert("P"), "PNG"), (20, 30), "P->RGB (palette expanded)"),
    "palette with transparency": (encoded(RGB.convert("P"), "PNG", transparency=0), (20, 30),
                                  "P->RGBA->RGB (alpha composited on white)"),
    "RGBA": (encoded(Image.fromarray(RNG.integers(0, 256, (20, 30, 4), dtype=np.uint8)), "PNG"), (20, 30),
             "RGBA->RGB (alpha composited on white)"),
    "16-bit gray": (encoded(Image.fromarray(RNG.integers(0, 65536, (20, 30), dtype=np.uint16)), "PNG"), (20, 30),
                    "I;16->RGB (16-bit gray scaled to 8-bit)"),
    "bilevel": (encoded(RGB.convert("1"), "PNG"), (20, 30), "1->RGB (gray replicated)"),
    "1x7": (encoded(Image.fromarray(RNG.integers(0, 256, (1, 7, 3), dtype=np.uint8)), "PNG"), (1, 7), "RGB"),
    "8000x16": (encoded(Image.fromarray(RNG.integers(0, 256, (16, 8000, 3), dtype=np.uint8)), "PNG"), (16, 8000),
                "RGB"),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_image_edge_cases_decode_to_rgb_say_what_was_done_and_round_trip_their_shape(case, cdc):
    data, shape, note = IMAGE_CASES[case]
    pixels, mode = decode_image(data)
    assert pixels.shape == (*shape, 3) and pixels.dtype == np.uint8 and mode == note
    assert cdc.decompress(cdc.compress(pixels)).shape == pixels.shape


def swapped_primaries_profile() -> bytes:
    """The built-in sRGB profile with its red and green colorants swapped: an RGB profile that is not sRGB."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", data[128:132])[0]
    entries = {bytes(data[132 + 12 * i:136 + 12 * i]): 132 + 12 * i for i in range(count)}
    red, green = entries[b"rXYZ"], entries[b"gXYZ"]
    data[red + 4:red + 12], data[green + 4:green + 12] = data[green + 4:green + 12], data[red + 4:red + 12]
    return bytes(data)


def test_an_icc_profile_other_than_srgb_is_converted_and_said_so():
    red = Image.new("RGB", (4, 4), (200, 30, 30))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    pixels, mode = decode_image(encoded(red, "PNG", icc_profile=srgb))
    assert mode == "RGB" and (pixels == (200, 30, 30)).all()  # sRGB already: untouched
    pixels, mode = decode_image(encoded(red, "PNG", icc_profile=swapped_primaries_profile()))
    assert mode == "RGB (ICC profile 'sRGB built-in' converted to sRGB)"
    r, g, _ = pixels[0, 0].astype(int)
    assert g > r + 50  # the file's "red" channel meant green
    pixels, mode = decode_image(encoded(red, "PNG", icc_profile=b"not a profile"))
    assert "unreadable ICC profile not applied" in mode and (pixels == (200, 30, 30)).all()


def test_floating_point_images_are_refused_with_a_reason():
    data = encoded(Image.fromarray(RNG.random((5, 6)).astype(np.float32), mode="F"), "TIFF")
    with pytest.raises(ImageDecodeError, match="floating-point images are not supported") as error:
        decode_image(data)
    assert error.value.category == "unsupported pixel format"


# ---------------------------------------------------------------------- weights files
@pytest.fixture
def weights_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFPRESS_WEIGHTS", str(tmp_path))
    return tmp_path


def shipped_with(**changes) -> Weights:
    base = read_weights(SHIPPED_DIR / "cdc-hp128.safetensors")
    fields = {"codec": base.codec, "name": base.name, "config": base.config, "tensors": dict(base.tensors),
              "provenance": "red team", "training": {}}
    return Weights(**{**fields, **changes})


def test_hostile_weights_files_are_refused_with_what_is_wrong(weights_folder):
    (weights_folder / "huge.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{" + b" " * 64)
    save_weights(shipped_with(codec="jpeg2"), weights_folder / "family.safetensors")
    tensors = shipped_with().tensors
    save_weights(shipped_with(tensors={k: v for k, v in tensors.items() if k != "g_s.out.bias"}),
                 weights_folder / "missing.safetensors")
    poisoned = dict(tensors)
    poisoned["g_s.out.weight"] = poisoned["g_s.out.weight"].clone()
    poisoned["g_s.out.weight"].view(-1)[0] = float("nan")
    save_weights(shipped_with(tensors=poisoned), weights_folder / "nan.safetensors")
    expected = {"huge": "is not a readable safetensors weights file", "family": "unknown codec family 'jpeg2'",
                "missing": "lack CDC parameters", "nan": "g_s.out.weight hold NaN or infinite values"}
    for name, message in expected.items():
        with pytest.raises(ValueError, match=message):
            load_codec(name, device="cpu")


def test_weights_named_like_a_shipped_release_with_other_contents_never_stand_in_for_it(weights_folder):
    tensors = shipped_with().tensors
    tensors["g_s.out.bias"] = tensors["g_s.out.bias"] + 0.01
    save_weights(shipped_with(tensors=tensors), weights_folder / "cdc-hp128.safetensors")
    with pytest.raises(ValueError, match="has the name of the weights shipped inside diffpress"):
        load_codec("cdc-hp128", device="cpu")
    (weights_folder / "cdc-hp128.safetensors").unlink()
    save_weights(shipped_with(), weights_folder / "cdc-hp128.safetensors")  # the same weights: a copy is fine
    assert load_codec("cdc-hp128", device="cpu").weights_digest == read_weights(
        SHIPPED_DIR / "cdc-hp128.safetensors").digest
