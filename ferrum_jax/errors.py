"""Typed exceptions. Every error a user can cause is one of these, with a one-line message that
names the file, tensor, field or limit at fault; the CLI prints the message and exits with 2."""


class FerrumError(Exception):
    """Base class of every error ferrum-jax raises on bad input."""


class ModelNotFoundError(FerrumError):
    """A model path (or alias) that does not exist or holds no model files."""


class UnsupportedArchitectureError(FerrumError):
    """A checkpoint whose architecture ferrum-jax does not implement."""


class ConfigError(FerrumError):
    """A config.json (or GGUF metadata) field that is missing or has a value we cannot use."""


class CheckpointError(FerrumError):
    """Checkpoint tensors that are missing, unexpected, of the wrong shape, or unreadable."""


class TokenizerError(FerrumError):
    """A tokenizer or chat template that is missing or cannot be used."""


class PromptTooLongError(FerrumError):
    """A prompt (plus requested tokens) that does not fit the KV cache or the model's context."""


class SamplingError(FerrumError):
    """An invalid sampling parameter (negative temperature, top_p outside (0, 1], ...)."""
