"""Errors that speak to the user.

Every problem with user input (a config key, a mesh, a checkpoint) is raised as one of these kinds,
with the file, key or tensor name in the message. The CLI prints the message as one line and exits
with status 2; library users can catch `QwenJaxError`.
"""


class QwenJaxError(Exception):
    """Base class: a problem with what the user gave us, not a bug in qwenjax."""


class ConfigError(QwenJaxError):
    """A config file or dict has an unknown key, a wrong type or an inconsistent value."""


class MeshError(QwenJaxError):
    """A mesh shape does not fit the devices, or an axis table is invalid."""


class ConversionError(QwenJaxError):
    """A checkpoint is missing tensors, has unexpected or mis-shaped ones, or is truncated."""


class CheckpointError(QwenJaxError):
    """An Orbax checkpoint directory is missing, incomplete or unreadable."""


class OutputError(QwenJaxError):
    """An output path cannot be written as asked: not empty and not a previous output of the
    same kind, its own input, a file, or an unwritable place (see `qwenjax.atomic`)."""


class GenerationError(QwenJaxError, ValueError):
    """Bad arguments to generation: sampling settings, prompts, token ids. Also a ValueError,
    which is what these were before they had a kind of their own."""
