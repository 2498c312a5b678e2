"""Model families. Importing a family module registers its named configurations."""

from . import t2t_vit, vit  # noqa: F401  (importing a family module registers its configs)
from ._base import VitkitModel, get_model_class
from ._pretrained import from_pretrained, load_pretrained, load_weights, read_state_dict, save_pretrained
from ._registry import (
    create_model,
    list_models,
    model_defaults,
    model_family,
    register_config,
    register_model,
    resolve_model_args,
)
from .t2t_vit import T2TViT
from .vit import VisionTransformer

__all__ = [
    "VitkitModel", "get_model_class", "from_pretrained", "load_pretrained", "load_weights", "read_state_dict",
    "save_pretrained", "create_model", "list_models", "model_defaults", "model_family", "register_config",
    "register_model", "resolve_model_args", "VisionTransformer", "T2TViT",
]
