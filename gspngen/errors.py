"""Errors raised for bad specs (tensor errors use the built-in ValueError/TypeError)."""

from __future__ import annotations


class SpecError(ValueError):
    """A spec field is missing, unknown, of the wrong type or out of range.

    The message always names the field, the value given and what is allowed, so
    the CLI can print it as one line and exit 2.
    """

    def __init__(self, field: str, value: object, allowed: str, *, line: int | None = None):
        self.field = field
        self.value = value
        self.allowed = allowed
        self.line = line
        where = f" (line {line})" if line is not None else ""
        super().__init__(f"spec field '{field}'{where}: got {value!r}; expected {allowed}")
