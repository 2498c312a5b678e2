"""Import the peer libraries used as parity references (timm, open_clip) in tests.

``vitkit.utils.make_torchvision_importable`` runs first (tests/conftest.py also runs it for the whole session):
the PyPI torchvision wheel is a CUDA build whose operators cannot load beside the CPU torch, and timm, open_clip and
transformers' vision models import torchvision.
"""

from __future__ import annotations

import warnings

import pytest

from vitkit.utils import make_torchvision_importable


def import_peer(name: str):
    """``pytest.importorskip(name)`` for timm / open_clip, after making torchvision importable on CPU torch."""
    make_torchvision_importable()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip(name)
