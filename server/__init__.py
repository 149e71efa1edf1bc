"""An HTTP server in front of llama_lib's continuous-batching engine, with llama-server's and
OpenAI's API: `python -m server -m model.gguf -np 4` (or the `pyllama-server` console script).

The layout and the choices worth knowing (where llama-server leaves room or we differ) are in
docs/server.md.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
