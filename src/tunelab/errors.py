"""Errors a user can act on: each names the place (file, line, field) and the fix.

The CLI prints a TunelabError as one paragraph and exits with its ``exit_code``; any other
exception is a bug in tunelab and keeps its traceback.
"""

from __future__ import annotations


class TunelabError(Exception):
    """Base class: ``where`` (file:line, config key, ...), ``message`` and ``fix``."""

    exit_code = 2
    kind = "error"

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        self.message = message.rstrip()
        self.where = where
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        """The whole error as one paragraph."""
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.fix:
            text = f"{text.rstrip('.')}. Fix: {self.fix}"
        return text


class ConfigError(TunelabError):
    """The YAML config is unreadable, has unknown keys, wrong types or impossible values."""

    kind = "config error"


class DataError(TunelabError):
    """A data file is missing, unreadable, or has a malformed record."""

    kind = "data error"


class ModelError(TunelabError):
    """The base model or tokenizer cannot be found or loaded."""

    kind = "model error"


class RunError(TunelabError):
    """A run directory is missing, incomplete, or would be overwritten."""

    kind = "run error"


class Interrupted(TunelabError):
    """The user pressed Ctrl-C; what could be saved was saved."""

    exit_code = 130
    kind = "interrupted"


class TrainingError(TunelabError):
    """Training cannot go on: NaN/inf loss, disk full, no trainable parameters."""

    exit_code = 3
    kind = "training error"
