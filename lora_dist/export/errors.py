"""The errors of the merged export and the offline merge (verification has its own, :class:`VerifyError`)."""

from __future__ import annotations

from lora_dist.errors import UserError
from lora_dist.outputs import OutputError

__all__ = ["ExportError", "ExportOverflowError", "OutputExistsError", "OutputRefusedError"]


class ExportError(UserError, RuntimeError):
    """A merged checkpoint could not be written."""


class OutputExistsError(ExportError, FileExistsError):
    """The output dir exists and overwriting was not asked for."""


class OutputRefusedError(ExportError, OutputError):
    """An output the export may not write, ``--overwrite`` or not: an input (or a dir containing or inside one),
    or an existing path lora_dist did not write."""


class ExportOverflowError(ExportError):
    """A tensor is not finite in the dtype it would be written in (an fp16/bf16 overflow); nothing was written."""
