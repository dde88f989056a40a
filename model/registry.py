"""Weights files and the name -> codec registry.

A weights file is one safetensors file whose metadata holds the codec family, the
registry name, the JSON config, a provenance line (the command that made it) and, for
trained weights, a JSON `training` record (CDC: the loss weights beta and rho). The
digest covers the codec, config and tensors, not provenance or training: recording how
weights were made never changes which streams they decode. Nothing here unpickles anything.

Names resolve, in order, to: a path to a file or folder; `<name>.safetensors` in
$DIFFPRESS_WEIGHTS; in the weights shipped inside this package (model/weights/);
in ~/.cache/diffpress/weights (where `diffpress import-uqdm` writes by default). A short
name of the catalog's (`uqdm-tiny`, `cdc`) stands for its release when no file has that name
itself; an unknown name is refused with how to get the release it names, or the installed
names it may be a typo of.

A stream or archive names the weights it needs by digest. `load_codec_for(name, digest)`
loads them by name, or finds an installed file with that digest under another name, or
raises `WeightsNotInstalled` naming the weights and how to get them from the catalog of
every release (weights/catalog.json).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .files import atomic_path

if TYPE_CHECKING:
    from .codec import Codec

FORMAT = "diffpress-weights/1"
SHIPPED_DIR = Path(__file__).parent / "weights"
USER_DIR = Path.home() / ".cache" / "diffpress" / "weights"
CATALOG = SHIPPED_DIR / "catalog.json"


class WeightsNotInstalled(FileNotFoundError):
    """The weights a stream or archive was written with are not installed here (the message says how to get them)."""


@dataclass
class Weights:
    codec: str
    name: str
    config: dict
    tensors: dict[str, torch.Tensor] = field(repr=False)
    provenance: str = ""
    training: dict = field(default_factory=dict)  # how they were trained (CDC: beta, rho); not digested

    @property
    def digest(self) -> bytes:
        """16 bytes identifying config + tensor values, independent of file layout."""
        cached = self.__dict__.get("_digest")
        if cached is None:
            cached = self.__dict__["_digest"] = weights_digest(self.codec, self.config, self.tensors)
        return cached


def weights_digest(codec: str, config: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    h = hashlib.sha256()
    h.update(codec.encode())
    h.update(json.dumps(config, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()[:16]


def save_weights(weights: Weights, path: str | Path, replace: bool = False) -> Path:
    """Write a weights file whole or not at all (a temporary file renamed into place), readable by all (0644).

    Weights that may have written streams are never changed in place: a file at `path`
    holding other weights (another digest) is kept, and FileExistsError says so, unless
    `replace` (for work in progress, such as a training run's own earlier export); a
    release in the catalog is never replaced.
    """
    path = Path(path)
    if path.is_file():
        old = file_digest(path)
        if old != weights.digest and (not replace or catalog_entry(old.hex()) is not None):
            raise FileExistsError(f"{path} holds other weights ({describe_weights(old)}); weights that may have "
                                  "written streams are never changed in place: save these under another name")
    metadata = {"format": FORMAT, "codec": weights.codec, "name": weights.name,
                "config": json.dumps(weights.config, sort_keys=True), "provenance": weights.provenance}
    if weights.training:
        metadata["training"] = json.dumps(weights.training, sort_keys=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.tensors.items()}
    with atomic_path(path) as partial:
        save_file(tensors, str(partial), metadata=metadata)
    return path


def read_weights(path: str | Path) -> Weights:
    """A weights file; ValueError for one that is not a safetensors file, not ours, or holds NaN
    or infinite values (a damaged file that would decode wrong images without a word)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a diffpress weights file (metadata format {meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors weights file: {exc}") from None
    damaged = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if damaged:
        raise ValueError(f"{path} is damaged: {', '.join(damaged[:3])} hold NaN or infinite values")
    return Weights(meta["codec"], meta["name"], json.loads(meta["config"]), tensors, meta.get("provenance", ""),
                   json.loads(meta.get("training", "{}")))


def resolve(name_or_path: str | Path) -> Path:
    """Find the weights file for a registry name or a path; raise with a fix if none."""
    candidate = Path(name_or_path)
    if candidate.is_dir():
        files = sorted(candidate.glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(f"{candidate} must hold exactly one .safetensors weights file")
        return files[0]
    if candidate.suffix == ".safetensors" or candidate.is_file():
        if not candidate.is_file():
            raise FileNotFoundError(f"no weights file at {candidate}")
        return candidate
    searched = search_dirs()
    name = str(name_or_path)
    for folder in searched:
        path = folder / f"{_unalias(name)}.safetensors"
        if path.is_file():
            _refuse_shadowing(path)
            return path
    raise FileNotFoundError(f"unknown codec weights {name!r}; looked in {', '.join(map(str, searched))}. "
                            f"Available: {', '.join(available()) or 'none'}.{_missing_hint(name)}")


def _refuse_shadowing(path: Path) -> None:
    """A file found by name that has a shipped release's name but other contents is refused:
    it would stand in for the release under its name in every job and manifest."""
    shipped = SHIPPED_DIR / path.name
    if path.parent.resolve() != SHIPPED_DIR.resolve() and shipped.is_file():
        found, release = file_digest(path), file_digest(shipped)
        if found != release:
            raise ValueError(f"{path} has the name of the weights shipped inside diffpress ({shipped.stem}, digest "
                             f"{release.hex()}) but other contents (digest {found.hex()}): rename it")


def _missing_hint(name: str) -> str:
    """How to get a release that is not installed (from the catalog), else the installed names it may be a typo of.

    Only for a release missing here does it say how to get it: a user who imported the UQDM
    weights and mistyped their name is shown the name, not told to import them again.
    """
    installed = available()
    usable = installed + [short for short, release in aliases().items() if release in installed]
    close = difflib.get_close_matches(name, usable, n=3, cutoff=0.6)
    if close:
        return f" Did you mean {' or '.join(close)}?"
    releases = {e["name"]: e for e in _catalog()["weights"]}
    wanted = difflib.get_close_matches(name, [*releases, *aliases()], n=1, cutoff=0.6)
    if not wanted:
        return ""
    release = aliases().get(wanted[0], wanted[0])
    return f" {release} is a release that is not installed here; to get it: {releases[release]['get']}."


def aliases() -> dict[str, str]:
    """Short names ("uqdm-tiny", "cdc") -> the release they stand for (catalog.json); a weights
    file with the short name itself wins over its alias."""
    return dict(_catalog()["aliases"])


def _unalias(name: str) -> str:
    """`name`, unless it is an alias and no weights file has the name itself: then its release."""
    if name not in aliases() or any((folder / f"{name}.safetensors").is_file() for folder in search_dirs()):
        return name
    return aliases()[name]


def canonical_name(name_or_path: str | Path) -> str:
    """The name `load_codec` resolves: an alias replaced by its release (variant kept), anything else unchanged."""
    path, variant = split_variant(name_or_path)
    text = str(path) if Path(path).exists() else _unalias(str(path))
    return f"{text}:{variant}" if variant else text


def search_dirs() -> list[Path]:
    env = os.environ.get("DIFFPRESS_WEIGHTS")
    return ([Path(env)] if env else []) + [SHIPPED_DIR, USER_DIR]


def available() -> list[str]:
    names = {p.stem for folder in search_dirs() if folder.is_dir() for p in folder.glob("*.safetensors")}
    return sorted(names)


def catalog_entry(digest: bytes | str) -> dict | None:
    """The catalog's entry for a digest (the full 16 bytes, or a stream's 8-byte prefix), if any."""
    prefix = digest.hex() if isinstance(digest, bytes) else digest
    return next((e for e in _catalog()["weights"] if e["digest"].startswith(prefix)), None)


def catalog() -> list[dict]:
    """Every released weights name: name, family, digest (hex), how to get it."""
    return list(_catalog()["weights"])


@lru_cache(maxsize=1)
def _catalog() -> dict:
    return json.loads(CATALOG.read_text())


def describe_weights(digest: bytes | str) -> str:
    """"cdc-hp128 (digest 1ded...): shipped inside diffpress" or, for weights no release knows, the digest alone."""
    hex_digest = digest.hex() if isinstance(digest, bytes) else digest
    entry = catalog_entry(hex_digest)
    if entry is None:
        return f"weights with digest {hex_digest}, which no diffpress release made (your own weights?)"
    return f"{entry['name']} (digest {entry['digest']}): {entry['get']}"


def installed_with_digest(digest: bytes | str) -> Path | None:
    """An installed weights file whose digest is (or starts with) `digest`, under any name."""
    prefix = digest.hex() if isinstance(digest, bytes) else digest
    for folder in search_dirs():
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            try:
                if file_digest(path).hex().startswith(prefix):
                    return path
            except (OSError, ValueError):
                continue  # not a weights file: not what we look for
    return None


@lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> bytes:
    return read_weights(path).digest


def file_digest(path: Path) -> bytes:
    stat = path.stat()
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


def load_codec_for(name: str, digest: str, device: str | torch.device | None = None) -> Codec:
    """The codec that decodes streams written by `name` with weights `digest` (hex).

    By name first; if those weights are missing or are other weights, any installed file
    with the digest; else WeightsNotInstalled, one line naming the weights and how to get them.
    """
    try:
        codec = load_codec(name, device=device)
        if codec.weights_digest.hex().startswith(digest):
            return codec
    except FileNotFoundError:
        pass
    path = installed_with_digest(digest)
    if path is None:
        raise WeightsNotInstalled(f"written with {name}, whose weights are not installed here: "
                                  f"{describe_weights(digest)}")
    _, variant = split_variant(name)
    return load_codec(f"{path}:{variant}" if variant else path, device=device)


def load_codec(name_or_path: str | Path, device: str | torch.device | None = None) -> Codec:
    """Load a codec by registry name or weights path, optionally with a variant after a colon.

    "uqdm-tiny-exact2"; "cdc-hp128" (its default rate point) or "cdc-hp128:q2" (a named one).
    """
    path, variant = split_variant(name_or_path)
    weights = read_weights(resolve(path))
    cls = codec_class(weights.codec)
    if variant is None:
        return cls(weights, device=device)
    if not cls.has_variants:
        raise ValueError(f"{weights.name!r} ({weights.codec}) has no variants; drop ':{variant}'")
    return cls(weights, device=device, variant=variant)


def split_variant(name_or_path: str | Path) -> tuple[str | Path, str | None]:
    """"cdc-hp128:q2" -> ("cdc-hp128", "q2"); names without a colon, and existing paths, have none."""
    text = str(name_or_path)
    if ":" not in text or Path(text).exists() or "/" in text.rsplit(":", 1)[1]:
        return name_or_path, None
    name, variant = text.rsplit(":", 1)
    return name, variant


#: Codec family (as written in weights files and streams) -> "module:class" of its Codec.
#: Imported on first use, so this module needs none of the networks, and codec modules may
#: import the registry without a circle.
FAMILIES: dict[str, str] = {
    "uqdm": "model.uqdm.codec:UQDMCodec",
    "cdc": "model.cdc.codec:CDCCodec",
}


def codec_class(family: str) -> type[Codec]:
    if family not in FAMILIES:
        raise ValueError(f"unknown codec family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    module, _, name = FAMILIES[family].partition(":")
    return getattr(importlib.import_module(module), name)
