"""One error hierarchy for the whole kit.

Every error a user can trigger by bad input derives from `CharacterTrainingError`, so a
notebook or the CLI can catch one class and print a single readable line. Each category also
inherits the stdlib error it replaces (`ValueError`, `RuntimeError`, ...), so code that already
catches those keeps working. Messages follow one rule: say what was expected, what was found,
and how to fix it, on one line.
"""

from __future__ import annotations


class CharacterTrainingError(Exception):
    """Base class of every error raised on purpose by this package."""


class ConfigError(CharacterTrainingError, ValueError):
    """A parameter file, override or argument has a wrong name, type or value."""


class DataError(CharacterTrainingError, ValueError):
    """Input data (a constitution, a JSONL file, a batch of datums) is malformed."""


class RendererError(CharacterTrainingError, ValueError):
    """A chat renderer is unknown or cannot represent the conversation it was given."""


class BackendError(CharacterTrainingError, RuntimeError):
    """A backend cannot do what was asked (unknown model, missing checkpoint, bad call)."""


class MissingCredentialsError(BackendError):
    """A remote backend was requested but its credentials are not in the environment."""
