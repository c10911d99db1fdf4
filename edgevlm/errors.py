"""Errors a user can act on: each names the problem and the fix.

The CLI prints ``str(err)`` on one line and exits non-zero; nothing else of a stack trace.
"""
from __future__ import annotations


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of a third-party exception's message (its type name when it has none), for a one-line error."""
    lines = str(e).splitlines()
    return lines[0][:limit] if lines and lines[0] else type(e).__name__


class EdgeVLMError(Exception):
    """Base error. ``problem`` says what is wrong, ``fix`` what to do about it."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}" + (f" — fix: {fix}" if fix else ""))


class UnknownNameError(EdgeVLMError, KeyError):
    """A model, target, precision or format name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class CheckpointError(EdgeVLMError):
    """A checkpoint that is missing, corrupt, unsafe, or does not fit the model."""


class CalibrationError(EdgeVLMError):
    """A calibration set that is empty or unreadable."""


class ImageError(EdgeVLMError):
    """An input that is not a decodable image of a sensible size."""


class BundleError(EdgeVLMError):
    """A bundle that is missing, tampered with, or from an incompatible schema."""


class ExportError(EdgeVLMError):
    """An export step that could not be carried out."""


class ValidationError(ExportError):
    """An exported artifact that does not reproduce eager PyTorch within tolerance."""


class ConfigError(EdgeVLMError):
    """Options that contradict each other or the target profile."""


class BackendUnavailableError(EdgeVLMError):
    """A backend package or platform that is not present on this machine."""
