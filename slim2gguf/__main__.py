"""``python -m slim2gguf`` is the ``slim2gguf`` command."""

from .cli import app

app(prog_name="slim2gguf")
