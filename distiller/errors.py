"""Errors that are the user's to fix: the CLI prints them as one clear line, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a file, a name, a setting): the message says where and what was expected."""


class SpecError(UserError):
    """A task spec that does not validate: names the file, the key and what was expected."""

    def __init__(self, path: str, key: str, expected: str, line: int | None = None):
        self.path, self.key, self.expected, self.line = str(path), key, expected, line
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {key}: {expected}")
