"""The spec language (DESIGN §2): parse, validate, normalise and hash a GSPN spec.

A spec may come from a stranger, so validation is strict: unknown keys, wrong
types (``True`` is not an integer here) and out-of-range values raise
:class:`SpecError`. Only validated identifiers and numbers ever leave this
module towards generated code.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import SpecError, show_value

DIRECTIONS = ("lr", "rl", "tb", "bt")
NORMALIZATIONS = ("stability", "softmax", "none")
MERGES = ("sum", "mean", "learned", "stack")
LAYOUTS = ("nchw", "nhwc")
PRECISIONS = ("fp32", "fp16", "bf16")
BACKENDS = ("cuda", "triton", "cpu")
NAME_RE = re.compile(r"[a-z_][a-z0-9_]{0,63}")
MAX_CONNECTION = 9
# chunk and an integer weight_groups reach kernels as 32-bit integer arguments
MAX_INT32 = 2**31 - 1

DEFAULTS: dict[str, Any] = {
    "connection": 3,
    "directions": list(DIRECTIONS),
    "normalization": "stability",
    "weight_groups": "channel",
    "chunk": None,
    "modulation": True,
    "skip": True,
    "merge": "learned",
    "layout": "nchw",
    "precision": ["fp32", "bf16"],
    "backends": ["cuda", "triton", "cpu"],
}
FIELDS = ("name",) + tuple(DEFAULTS)


# Exact built-in types only: a str or int subclass could carry its own __str__/__format__ into
# generated code, and bool is an int. Accepted strings are replaced by this module's constants.
def _is_int(v: object) -> bool:
    return type(v) is int


def _choice(field: str, v: object, allowed: tuple[str, ...]) -> str:
    if type(v) is not str or v not in allowed:
        raise SpecError(field, v, "one of " + ", ".join(allowed))
    return allowed[allowed.index(v)]


def _subset(field: str, v: object, allowed: tuple[str, ...], *, empty_ok: bool) -> tuple[str, ...]:
    what = ("a list" if empty_ok else "a non-empty list") + " of distinct values from " + ", ".join(allowed)
    if not isinstance(v, (list, tuple)) or (not v and not empty_ok):
        raise SpecError(field, v, what)
    for item in v:
        if type(item) is not str or item not in allowed:
            raise SpecError(field, v, what + f" ({show_value(item)} is not allowed)")
    if len(set(v)) != len(v):
        raise SpecError(field, v, what + " (repeated entry)")
    return tuple(allowed[allowed.index(item)] for item in v)


def _bool(field: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise SpecError(field, v, "true or false")
    return v


@dataclass(frozen=True)
class Spec:
    """A validated, normalised GSPN spec. Build it with :meth:`from_dict` / :meth:`from_yaml`."""

    name: str
    connection: int = 3
    directions: tuple[str, ...] = DIRECTIONS
    normalization: str = "stability"
    weight_groups: str | int = "channel"
    chunk: int | None = None
    modulation: bool = True
    skip: bool = True
    merge: str = "learned"
    layout: str = "nchw"
    precision: tuple[str, ...] = ("fp32", "bf16")
    backends: tuple[str, ...] = ("cuda", "triton", "cpu")

    def __post_init__(self) -> None:
        # Validate even when constructed directly, so no unchecked Spec exists.
        _validate_into(self)

    # -- construction -----------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Spec":
        if not isinstance(data, Mapping):
            raise SpecError("<document>", data, "a mapping of spec fields")
        for key in data:
            if key not in FIELDS:
                raise SpecError(str(key)[:80], data[key], _unknown_field(key))
        if "name" not in data:
            raise SpecError("name", None, "a required identifier matching [a-z_][a-z0-9_]{0,63}")
        # Lists from YAML/JSON become tuples during validation (__post_init__).
        return cls(**{**DEFAULTS, **data})

    @classmethod
    def from_yaml(cls, text: str) -> "Spec":
        try:
            data = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 (a SafeLoader)
        except SpecError:
            raise
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            # An unclosed bracket or quote is noticed lines later (problem_mark); the line
            # where it was opened (context_mark) is where the fix goes.
            ctx = getattr(exc, "context_mark", None)
            if ctx is not None and line is not None and ctx.line + 1 < line:
                opened = re.sub(r"^while (parsing|scanning) an? ", "", getattr(exc, "context", None) or "a value")
                problem = f"{opened} opened here is not closed (noticed on line {line})"
                line = ctx.line + 1
            raise SpecError("<yaml>", problem, "valid YAML", line=line) from None
        except RecursionError:
            raise SpecError("<yaml>", "nesting too deep", "a flat mapping of spec fields") from None
        except ValueError as exc:  # e.g. an integer beyond Python's digit limit
            raise SpecError("<yaml>", str(exc).split(";")[0], "valid YAML") from None
        return cls.from_dict(data)

    # -- views --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The normalised spec: every field, defaults filled, lists in canonical form."""
        return {
            "name": self.name,
            "connection": self.connection,
            "directions": list(self.directions),
            "normalization": self.normalization,
            "weight_groups": self.weight_groups,
            "chunk": self.chunk,
            "modulation": self.modulation,
            "skip": self.skip,
            "merge": self.merge,
            "layout": self.layout,
            "precision": list(self.precision),
            "backends": list(self.backends),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def hash(self) -> str:
        """Stable sha256 of the normalised spec (independent of key order and defaults)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @property
    def radius(self) -> int:
        return (self.connection - 1) // 2

    @property
    def num_directions(self) -> int:
        return len(self.directions)

    def groups(self, channels: int) -> int:
        """G for a given channel count C (DESIGN §3)."""
        if self.weight_groups == "channel":
            return channels
        if self.weight_groups == "shared":
            return 1
        return int(self.weight_groups)


def _validate_into(spec: Spec) -> None:
    set_ = object.__setattr__
    if type(spec.name) is not str or not NAME_RE.fullmatch(spec.name):
        raise SpecError("name", spec.name, "an identifier matching [a-z_][a-z0-9_]{0,63}")
    k = spec.connection
    if not _is_int(k) or not (1 <= k <= MAX_CONNECTION) or k % 2 == 0:
        raise SpecError("connection", k, f"an odd integer from 1 to {MAX_CONNECTION}")
    set_(spec, "directions", _subset("directions", spec.directions, DIRECTIONS, empty_ok=False))
    set_(spec, "normalization", _choice("normalization", spec.normalization, NORMALIZATIONS))
    g = spec.weight_groups
    if isinstance(g, str):
        set_(spec, "weight_groups", _choice("weight_groups", g, ("channel", "shared")))
    elif not _is_int(g) or not 1 <= g <= MAX_INT32:
        raise SpecError("weight_groups", g, f"channel, shared, or an integer from 1 to {MAX_INT32} that divides C")
    elif g == 1:
        set_(spec, "weight_groups", "shared")  # one group is weight sharing; one canonical form
    c = spec.chunk
    if c is not None and (not _is_int(c) or not 1 <= c <= MAX_INT32):
        raise SpecError("chunk", c, f"null (global scan) or an integer from 1 to {MAX_INT32}")
    _bool("modulation", spec.modulation)
    _bool("skip", spec.skip)
    set_(spec, "merge", _choice("merge", spec.merge, MERGES))
    set_(spec, "layout", _choice("layout", spec.layout, LAYOUTS))
    prec = _subset("precision", spec.precision, PRECISIONS, empty_ok=False)
    set_(spec, "precision", tuple(p for p in PRECISIONS if p in prec))
    be = _subset("backends", spec.backends, BACKENDS, empty_ok=True)
    set_(spec, "backends", tuple(b for b in BACKENDS if b in be))


def _unknown_field(key: object) -> str:
    """'no such field', with the closest known field when one is close (a typo), then the list."""
    import difflib

    close = difflib.get_close_matches(str(key)[:80], FIELDS, n=1, cutoff=0.6) if isinstance(key, str) else []
    hint = f"no such field (did you mean '{close[0]}'?)" if close else "no such field"
    return f"{hint}; known fields: " + ", ".join(FIELDS)


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML reports it below
                continue
            seen[key] = line
            if first is not None:
                again = self.construct_object(value_node) if isinstance(value_node, yaml.ScalarNode) else "..."
                raise SpecError(str(key)[:80], again, f"each field at most once (it is already given on line {first})",
                                line=line)
        return super().construct_mapping(node, deep=deep)


def load_spec(path: str | Path) -> Spec:
    """Read and validate a YAML spec file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError("<file>", str(path), f"a readable YAML file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise SpecError("<file>", str(path), "a YAML text file in UTF-8") from None
    return Spec.from_yaml(text)


def as_spec(spec: "Spec | Mapping[str, Any] | str | Path") -> Spec:
    """Accept a Spec, a mapping, or a path to a YAML file."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, Mapping):
        return Spec.from_dict(spec)
    if isinstance(spec, (str, Path)):
        return load_spec(spec)
    raise TypeError(f"spec: expected a gspngen.Spec, a mapping or a YAML path, got {type(spec).__name__}")
