"""Converters from foreign checkpoints (Hugging Face, official repositories) to vitkit checkpoints.

Each converter is a function and a ``vitkit convert <kind> SRC DST`` command.
"""

import os
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from .efficientvit import convert_efficientvit, convert_efficientvit_state_dict, load_efficientvit
from .hf_clip import convert_hf_clip, convert_hf_clip_state_dict, load_hf_clip, load_tokenizer
from .hf_swin import convert_hf_swin, convert_hf_swin_state_dict, load_hf_swin
from .hf_vilt import convert_hf_vilt, convert_hf_vilt_state_dict, load_hf_vilt
from .hf_vit import convert_hf_vit, convert_hf_vit_state_dict, load_hf_vit
from .hf_vit_mae import convert_hf_vit_mae, convert_hf_vit_mae_state_dict, load_hf_vit_mae
from .t2t import convert_t2t, convert_t2t_state_dict, load_t2t
from .var import (
    convert_var,
    convert_var_state_dict,
    convert_var_vqvae,
    convert_vqvae_state_dict,
    load_var,
    load_var_vqvae,
)

CONVERTERS = {
    "hf-vit": convert_hf_vit,
    "hf-vit-mae": convert_hf_vit_mae,
    "hf-swin": convert_hf_swin,
    "hf-vilt": convert_hf_vilt,
    "hf-clip": convert_hf_clip,
    "var": convert_var,
    "var-vqvae": convert_var_vqvae,
    "t2t": convert_t2t,
    "efficientvit": convert_efficientvit,
}


def convert(kind: str, src: str, dst: str, **overrides):
    """Run the converter ``kind`` (see ``CONVERTERS``) from ``src`` to a vitkit folder ``dst``.

    ``overrides`` are constructor arguments the weights cannot tell (e.g. ``num_heads`` for T2T-ViT).
    """
    try:
        fn = CONVERTERS[kind]
    except KeyError:
        raise ConfigError(f"unknown converter {kind!r}; choose one of {sorted(CONVERTERS)}") from None
    _check_destination(Path(dst))
    return fn(src, dst, **overrides)


def _check_destination(dst: Path) -> None:
    """Fail before converting when ``dst`` cannot become a checkpoint folder."""
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"destination {dst} exists and is not a folder")
    existing = dst
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write the destination {dst}: {existing} is not a writable folder")


__all__ = ["CONVERTERS", "convert", "convert_hf_vit", "convert_hf_vit_state_dict", "load_hf_vit",
           "convert_hf_vit_mae", "convert_hf_vit_mae_state_dict", "load_hf_vit_mae", "convert_t2t",
           "convert_t2t_state_dict", "load_t2t", "convert_hf_swin",
           "convert_hf_swin_state_dict", "load_hf_swin", "convert_efficientvit",
           "convert_efficientvit_state_dict", "load_efficientvit", "convert_hf_vilt",
           "convert_hf_vilt_state_dict", "load_hf_vilt", "convert_hf_clip",
           "convert_hf_clip_state_dict", "load_hf_clip", "load_tokenizer", "convert_var",
           "convert_var_state_dict", "load_var", "convert_var_vqvae", "convert_vqvae_state_dict", "load_var_vqvae"]
