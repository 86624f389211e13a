"""Renderers: fill the Jinja templates with the lowering's printed math, one module per target.

File names live here (no sympy or Jinja import) because the runtime looks
them up in compiled packages without rendering anything.
"""

TRITON_FILE = "triton_kernels.py"
