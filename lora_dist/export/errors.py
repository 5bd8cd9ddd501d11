"""The errors of the merged export and the offline merge (verification has its own, :class:`VerifyError`)."""

from __future__ import annotations

__all__ = ["ExportError", "OutputExistsError"]


class ExportError(RuntimeError):
    """A merged checkpoint could not be written."""


class OutputExistsError(ExportError, FileExistsError):
    """The output dir exists and overwriting was not asked for."""
