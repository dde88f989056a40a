"""The registry: family table, lazy codec imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from model.paths import REPO
from model.registry import FAMILIES, codec_class


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_names_its_codec_class(family):
    assert codec_class(family).family == family


def test_unknown_family_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown codec family 'jpeg'; known: cdc, uqdm"):
        codec_class("jpeg")


def test_the_registry_imports_no_codec_until_one_is_loaded():
    script = ("import sys, model, model.registry; "
              "print([m for m in sys.modules if m.startswith(('model.cdc', 'model.uqdm'))])")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "[]"
