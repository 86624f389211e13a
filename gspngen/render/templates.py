"""Find and load the Jinja templates, installed (gspngen.templates) or from a source checkout."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


def template_dir() -> Path:
    try:
        from importlib.resources import files

        path = Path(str(files("gspngen.templates")))
        if path.is_dir():
            return path
    except ModuleNotFoundError:
        pass
    # Source checkout run with PYTHONPATH=. : templates/ beside the package.
    return Path(__file__).resolve().parents[2] / "templates"


@lru_cache(maxsize=None)
def environment():
    """Strict environment: an undefined variable is an error, output is byte-stable (a jinja2.Environment;
    Jinja is imported here, not with the module: template_dir is read without it)."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def render(template: str, /, **context) -> str:
    return environment().get_template(template).render(**context)
