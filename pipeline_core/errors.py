"""Exceptions the pack raises on purpose.

Every message says what was wrong and what to do about it, because in ComfyUI the message is all the user
sees: it is shown in the error dialog of the node that failed.
"""


class IP2PError(Exception):
    """Base class for errors the user can act on."""


class ModelLoadError(IP2PError):
    """A model could not be found, read, or is not an InstructPix2Pix model."""


class InputError(IP2PError, ValueError):
    """An image, mask, prompt or setting handed to the pipeline is unusable."""
