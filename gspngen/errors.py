"""Errors raised for bad specs (tensor errors use the built-in ValueError/TypeError)."""

from __future__ import annotations

import reprlib

# A spec may come from a stranger: a few bytes of YAML aliases can expand to
# millions of items, so the value is shown abbreviated (bounded time and length).
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 80
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 8
_short.maxlevel = 2


def show_value(value: object) -> str:
    """repr(value), abbreviated; never fails (repr of a huge int raises ValueError)."""
    try:
        return _short.repr(value)
    except ValueError:
        return f"<{type(value).__name__} too large to print>"


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
        super().__init__(f"spec field {_field_text(field)}{where}: got {show_value(value)}; expected {allowed}")


def _field_text(field: object) -> str:
    """The field quoted; an unknown key from a stranger's document (newlines, control characters,
    quotes) is shown as its escaped repr so the message stays one safe line."""
    text = str(field)
    if text.isprintable() and "'" not in text and len(text) <= 80:
        return f"'{text}'"
    return show_value(text)


class NonFiniteError(FloatingPointError):
    """Finite-check mode (``gspngen.finite``): a tensor holds a NaN or inf.

    ``tensor`` names it (x, w, ..., y, gy, gx, ...), ``index`` is its first
    non-finite element, ``how`` says whether it "came in" or the op "produced" it.
    """

    def __init__(self, tensor: str, index: tuple, value: float, how: str, where: str):
        self.tensor, self.index, self.value, self.how, self.where = tensor, index, value, how, where
        origin = "came in (an input)" if how == "came in" else "was produced by gspngen from finite inputs"
        super().__init__(f"{tensor}: non-finite value {value} at index {index} {origin}; {where}")
