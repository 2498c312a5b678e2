"""Converters from foreign checkpoints (Hugging Face, official repositories) to vitkit checkpoints.

Each converter is a function and a ``vitkit convert <kind> SRC DST`` command.
"""

import inspect
import os
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..models import local_checkpoint
from . import efficientvit, hf_clip, hf_swin, hf_vilt, hf_vit, hf_vit_mae, openclip, t2t, timm, timm_resnet, var
from ._common import ConvertArg
from .efficientvit import convert_efficientvit, convert_efficientvit_state_dict, load_efficientvit
from .hf_clip import convert_hf_clip, convert_hf_clip_state_dict, load_hf_clip, load_tokenizer
from .hf_swin import convert_hf_swin, convert_hf_swin_state_dict, load_hf_swin
from .hf_vilt import convert_hf_vilt, convert_hf_vilt_state_dict, load_hf_vilt
from .hf_vit import convert_hf_vit, convert_hf_vit_state_dict, load_hf_vit
from .hf_vit_mae import convert_hf_vit_mae, convert_hf_vit_mae_state_dict, load_hf_vit_mae
from .openclip import convert_open_clip, convert_open_clip_state_dict, load_open_clip
from .t2t import convert_t2t, convert_t2t_state_dict, load_t2t
from .timm import convert_timm, convert_timm_state_dict, load_timm
from .timm_resnet import convert_timm_resnet, convert_timm_resnet_state_dict, load_timm_resnet
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
    "open-clip": convert_open_clip,
    "var": convert_var,
    "var-vqvae": convert_var_vqvae,
    "t2t": convert_t2t,
    "efficientvit": convert_efficientvit,
    "timm": convert_timm,
    "timm-resnet": convert_timm_resnet,
}

# The --arg keys of each converter (``vitkit convert KIND --help`` lists them): what the weights, a shipped config,
# or only the user can tell, and the default when nothing does.
CONVERTER_ARGS: dict[str, tuple[ConvertArg, ...]] = {
    "hf-vit": hf_vit.ARGS,
    "hf-vit-mae": hf_vit_mae.ARGS,
    "hf-swin": hf_swin.ARGS,
    "hf-vilt": hf_vilt.ARGS,
    "hf-clip": hf_clip.ARGS,
    "open-clip": openclip.ARGS,
    "var": var.ARGS,
    "var-vqvae": var.VQVAE_ARGS,
    "t2t": t2t.ARGS,
    "efficientvit": efficientvit.ARGS,
    "timm": timm.ARGS,
    "timm-resnet": timm_resnet.ARGS,
}


def convert(kind: str, src: str, dst: str, **overrides):
    """Run the converter ``kind`` (see ``CONVERTERS``) from ``src`` to a vitkit folder ``dst``.

    ``overrides`` are constructor arguments the weights cannot tell (e.g. ``num_heads`` for T2T-ViT). ``src`` may be
    a hub id, ``hf-hub:ORG/NAME[@REVISION]``, read from the local Hugging Face cache (downloaded first when online).
    """
    try:
        fn = CONVERTERS[kind]
    except KeyError:
        raise ConfigError(f"unknown converter {kind!r}; choose one of {sorted(CONVERTERS)}") from None
    declared = [a.name for a in CONVERTER_ARGS.get(kind, ())]
    unknown = sorted(set(overrides) - set(declared))
    if unknown:  # a key the converter does not declare would be a guess at what it means: refused before any work
        target = inspect.signature(fn).return_annotation  # the model class's name ("VisionTransformer"), or empty
        who = target if isinstance(target, str) and target.isidentifier() else "the converter"
        raise ConfigError(f"--arg {', '.join(unknown)}: {who} does not take {'it' if len(unknown) == 1 else 'them'} "
                          f"through `vitkit convert {kind}`; it takes {', '.join(declared) or 'none'} (see "
                          f"vitkit convert {kind} --help)")
    _check_destination(Path(dst))
    return fn(local_checkpoint(src), dst, **overrides)  # a hub id hf-hub:ORG/NAME is its cached snapshot


def _check_destination(dst: Path) -> None:
    """Fail before converting when ``dst`` cannot become a checkpoint folder."""
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"destination {dst} exists and is not a folder")
    existing = dst
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write the destination {dst}: {existing} is not a writable folder")


__all__ = ["convert_open_clip", "convert_open_clip_state_dict", "load_open_clip",
           "convert_timm", "convert_timm_state_dict", "load_timm",
           "convert_timm_resnet", "convert_timm_resnet_state_dict", "load_timm_resnet",
           "CONVERTERS", "CONVERTER_ARGS", "ConvertArg", "convert", "convert_hf_vit", "convert_hf_vit_state_dict",
           "load_hf_vit",
           "convert_hf_vit_mae", "convert_hf_vit_mae_state_dict", "load_hf_vit_mae", "convert_t2t",
           "convert_t2t_state_dict", "load_t2t", "convert_hf_swin",
           "convert_hf_swin_state_dict", "load_hf_swin", "convert_efficientvit",
           "convert_efficientvit_state_dict", "load_efficientvit", "convert_hf_vilt",
           "convert_hf_vilt_state_dict", "load_hf_vilt", "convert_hf_clip",
           "convert_hf_clip_state_dict", "load_hf_clip", "load_tokenizer", "convert_var",
           "convert_var_state_dict", "load_var", "convert_var_vqvae", "convert_vqvae_state_dict", "load_var_vqvae"]
