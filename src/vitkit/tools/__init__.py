"""Tools that act on a trained model: evaluate, predict, explain, export, fast inference, bench, ablate, search
and serve. They sit above the training engine (:mod:`vitkit.engine`) and reach every objective through the
public :class:`~vitkit.tasks.Task` interface, never by naming a task or a model family."""

from .evaluate import evaluate_checkpoint, load_model, resolve_model_dir
from .inference import InferenceModel, native_bf16_supported, prepare_for_inference, resolve_precision
from .predict import predict_images

__all__ = [
    "evaluate_checkpoint", "load_model", "resolve_model_dir", "predict_images", "InferenceModel",
    "native_bf16_supported", "prepare_for_inference", "resolve_precision",
]
