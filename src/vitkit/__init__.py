"""vitkit: the Vision Transformer family on PyTorch.

>>> import vitkit
>>> model = vitkit.create_model("vit_small_patch16_224", num_classes=10)
>>> vitkit.list_models("vit_*_patch16_*")
"""

from ._version import __version__  # noqa: E402,F401

# any checkpoint: a vitkit or run folder, a Hugging Face, timm or OpenCLIP folder, or a hub id hf-hub:ORG/NAME
from .convert.auto import load_checkpoint as from_pretrained  # noqa: E402
from .errors import CheckpointError, ConfigError, DataError, InputShapeError, VitkitError  # noqa: E402
from .layers import capture_attention  # noqa: E402
from .models import (  # noqa: E402
    VisionTransformer,
    create_model,
    list_models,
    register_model,
)

__all__ = [
    "__version__", "create_model", "list_models", "from_pretrained", "register_model", "capture_attention",
    "VisionTransformer", "VitkitError", "CheckpointError", "ConfigError", "DataError", "InputShapeError",
]
