"""Errors kvtools raises. Each message names what was wrong and what is allowed."""


class KVToolsError(Exception):
    """Base class of kvtools errors."""


class ConfigError(KVToolsError, ValueError):
    """A config (preset, YAML, dict) is invalid: names the key, the value and what is allowed."""


class UnsupportedModelError(KVToolsError, TypeError):
    """The model's family has no adapter; the message lists the supported families."""


class InputTooLongError(KVToolsError, ValueError):
    """A prompt does not fit the model's context (or the requested length)."""


class ModelNotAvailableError(KVToolsError, FileNotFoundError):
    """A model package or file is missing; the message names the install command."""
