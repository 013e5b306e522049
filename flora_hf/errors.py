"""Errors flora-hf raises for bad input; the CLI turns each into one readable line and a non-zero exit."""


class FloraError(ValueError):
    """Base class: the message names the offending input and what would be accepted."""


class UnsupportedModelError(FloraError):
    """The model is not a ViT / DeiT / Swin image classifier flora-hf knows how to decompose."""


class SearchSpaceError(FloraError):
    """A ratio, subnet or search space that is invalid or does not match the model."""


class CheckpointError(FloraError):
    """A checkpoint that is corrupt, missing or of another kind than expected."""


class HubError(FloraError):
    """The Hugging Face Hub could not be reached, or refused a request (auth, permissions, bad repo id)."""
