"""User-facing errors: each carries a one-paragraph message that says what to do."""


class NewtuneError(Exception):
    """Base class of errors a user can cause and fix; the CLI prints them without a traceback."""

    exit_code = 2


class ConfigError(NewtuneError):
    """The YAML config (or an override) is invalid."""


class DataError(NewtuneError):
    """A dataset cannot be found, read or turned into training rows."""


class ModelError(NewtuneError):
    """A model, tokenizer or adapter cannot be found or loaded."""
