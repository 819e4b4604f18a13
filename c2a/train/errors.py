"""The trainer's own error: a run that cannot start or go on."""

from __future__ import annotations

from c2a.errors import UserError


class TrainingError(UserError, RuntimeError):
    """A run that cannot start or go on; the message says why and what to change. Every rank raises it alike."""
