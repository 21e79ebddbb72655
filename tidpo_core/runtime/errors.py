"""Errors caused by what the user gave (a file, a path, a setting), as opposed to bugs.

The pipeline shows them as a message with the paths involved and no traceback; a bug keeps its traceback.
"""

from __future__ import annotations

from typing import Any


class UserInputError(ValueError):
    """A bad file, a missing model, an impossible setting. `context` names what was at fault (paths, ids)."""

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.context = context
