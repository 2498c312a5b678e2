"""Converters from foreign checkpoints (Hugging Face, official repositories) to vitkit checkpoints.

Each converter is a function and a ``vitkit convert <kind> SRC DST`` command.
"""

from .hf_vit import convert_hf_vit, convert_hf_vit_state_dict, load_hf_vit
from .hf_vit_mae import convert_hf_vit_mae, convert_hf_vit_mae_state_dict, load_hf_vit_mae
from .t2t import convert_t2t, convert_t2t_state_dict, load_t2t

CONVERTERS = {
    "hf-vit": convert_hf_vit,
    "hf-vit-mae": convert_hf_vit_mae,
    "t2t": convert_t2t,
}


def convert(kind: str, src: str, dst: str, **overrides):
    """Run the converter ``kind`` (see ``CONVERTERS``) from ``src`` to a vitkit folder ``dst``.

    ``overrides`` are constructor arguments the weights cannot tell (e.g. ``num_heads`` for T2T-ViT).
    """
    try:
        fn = CONVERTERS[kind]
    except KeyError:
        raise ValueError(f"unknown converter {kind!r}; choose one of {sorted(CONVERTERS)}") from None
    return fn(src, dst, **overrides)


__all__ = ["CONVERTERS", "convert", "convert_hf_vit", "convert_hf_vit_state_dict", "load_hf_vit",
           "convert_hf_vit_mae", "convert_hf_vit_mae_state_dict", "load_hf_vit_mae", "convert_t2t",
           "convert_t2t_state_dict", "load_t2t"]
