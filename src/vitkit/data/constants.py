"""Normalisation statistics and label names of the datasets and pretraining recipes vitkit knows.

A leaf module (no vitkit imports), so models, data loaders, tasks and the CLI can all share these values
without importing each other.
"""

from __future__ import annotations

# ImageNet statistics (torchvision / timm convention), used by T2T-ViT and most CNN-era checkpoints.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# [-1, 1] scaling, used by the original ViT (big_vision) checkpoints.
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

# Fashion-MNIST: 28x28 grayscale, 10 classes; statistics of the 60k training images.
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INCEPTION_MEAN", "INCEPTION_STD", "FMNIST_MEAN", "FMNIST_STD",
           "FMNIST_CLASSES"]
