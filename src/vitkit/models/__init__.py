"""Model families. Importing a family module registers its named configurations."""

from . import ar, clip, efficientvit, hart, mae, resnet, simclr, swin, t2t_vit, var, vilt, vit, vqvae  # noqa: F401  (importing a family module registers its configs)
from ._base import EncoderWrapper, TokenClassifier, VitkitModel
from ._checks import check_model_arguments
from ._hub import is_hub_id, local_checkpoint
from ._pretrained import (
    checkpoint_folder,
    load_backbone,
    load_pretrained,
    load_weights,
    read_config,
    read_state_dict,
    save_pretrained,
)
from ._registry import (
    create_model,
    from_pretrained,
    get_model_class,
    list_models,
    model_argument_names,
    model_defaults,
    model_family,
    register_config,
    register_model,
    registered_class,
    resolve_model_args,
)
from .ar import GeneratorOutput, TokenGenerator
from .clip import CLIP, CLIPOutput, clip_loss
from .efficientvit import EfficientViT
from .hart import HART
from .mae import MAEOutput, MaskedAutoencoderViT
from .resnet import ResNet
from .swin import SwinTransformer
from .t2t_vit import T2TViT
from .var import VAR
from .vilt import ViLT
from .vit import VisionTransformer
from .vqvae import MultiScaleVQVAE, SingleScaleVQVAE, VQVAEOutput

__all__ = [
    "checkpoint_folder", "is_hub_id", "local_checkpoint",
    "VitkitModel", "TokenClassifier", "EncoderWrapper", "read_config", "get_model_class", "from_pretrained",
    "load_pretrained", "load_backbone", "load_weights", "read_state_dict", "save_pretrained", "create_model",
    "list_models", "model_argument_names", "check_model_arguments",
    "model_defaults", "model_family", "register_config", "register_model", "registered_class", "resolve_model_args",
    "VisionTransformer", "T2TViT", "SwinTransformer", "EfficientViT", "ResNet", "ViLT", "CLIP",
    "CLIPOutput", "clip_loss", "VAR", "MultiScaleVQVAE", "VQVAEOutput", "HART", "TokenGenerator", "GeneratorOutput",
    "SingleScaleVQVAE", "MaskedAutoencoderViT", "MAEOutput",
]
