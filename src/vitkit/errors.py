"""Exceptions that vitkit raises for bad input.

Every error names the file, key or shape that is wrong, so users never have to read a traceback
from deep inside torch to find out what went wrong.
"""

from __future__ import annotations


class VitkitError(Exception):
    """Base class of every error vitkit raises on purpose."""


class CheckpointError(VitkitError):
    """A checkpoint file or folder is missing, corrupt, or does not fit the model."""


class DataError(VitkitError):
    """A dataset, image file or archive cannot be used."""


class ConfigError(VitkitError, ValueError):
    """A configuration key is unknown or its value is invalid (a ValueError too, as Python code expects)."""


class InputShapeError(VitkitError, ValueError):
    """A tensor given to a model has the wrong shape, size or channel count."""


class TrainingError(VitkitError):
    """A run cannot go on: its loss became non-finite, or its state on disk does not allow resuming."""


class AssumedValueWarning(UserWarning):
    """A converter used a value that neither the weights nor a shipped config tell, and the value changes the
    outputs (an activation, a code lookup): the warning names the key, the value and the ``--arg`` that sets it."""


class MissingExtraError(VitkitError, ImportError):
    """An optional dependency is not installed: the message names the extra that brings it."""
