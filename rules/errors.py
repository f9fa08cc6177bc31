"""The one error bad rule data raises: it names the file and the field."""

from __future__ import annotations


class RulesError(ValueError):
    def __init__(self, file: str, field: str, message: str) -> None:
        super().__init__(f"{file}: {field}: {message}" if field else f"{file}: {message}")
        self.file = file
        self.field = field
        self.message = message
