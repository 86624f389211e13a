"""Jinja templates for the generated kernels (shipped in the wheel as gspngen.templates)."""
