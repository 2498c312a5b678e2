"""Training engine: config, loop, optimizers, checkpoints, distributed, evaluation and prediction."""

from .config import RunConfig, config_to_dict, config_to_yaml, load_config
from .evaluate import evaluate_checkpoint, load_model, predict_images, resolve_model_dir
from .inference import InferenceModel, native_bf16_supported, prepare_for_inference, resolve_precision
from .trainer import Trainer, train

__all__ = [
    "RunConfig", "config_to_dict", "config_to_yaml", "load_config", "evaluate_checkpoint", "load_model",
    "predict_images", "resolve_model_dir", "Trainer", "train", "InferenceModel", "native_bf16_supported",
    "prepare_for_inference", "resolve_precision",
]
