"""The errors that mean "bad input or environment": what the user can fix, reported as one line.

Every such error is a :class:`UserError`. Each module defines its own (``AdapterError`` in
:mod:`lora_dist.adapter`, ``ExportError`` in :mod:`lora_dist.export`...) as a subclass, next to the code that
raises it; :class:`ConfigError` lives here because every layer raises it, from the NF4 loader up. The CLI
reports any of :data:`USER_ERRORS` as one line with exit code 2 (a traceback would bury the fix), and a rank
that hits one raises the same type on every rank (:mod:`lora_dist.ranks`). This module imports nothing of
lora_dist, so any module can raise these errors.
"""

from __future__ import annotations

__all__ = ["USER_ERRORS", "ConfigError", "UserError"]


class UserError(Exception):
    """Bad input or environment, with a message that names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used as given."""


#: What the CLI reports as one line, exit code 2: lora_dist's own, and the OS's refusals of a path.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileExistsError, PermissionError)
