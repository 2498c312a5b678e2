"""The training engine: recipes (config), the loop (trainer), optimizers and schedules, atomic checkpoints and
processes (distributed). It knows nothing of objectives (those are :mod:`vitkit.tasks`) and nothing of the tools
that use a trained model (:mod:`vitkit.tools`)."""

from .config import RunConfig, config_to_dict, config_to_yaml, load_config
from .trainer import Trainer, train

__all__ = ["RunConfig", "config_to_dict", "config_to_yaml", "load_config", "Trainer", "train"]
