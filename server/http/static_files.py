"""Static files: the built-in chat page (server/http/static) or `--path DIR`, never a file
outside that folder."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

STATIC_DIR = Path(__file__).resolve().parent / "static"


def safe_join(root: Path, url_path: str) -> Path | None:
    """The file under root that url_path names, or None when it does not exist or would leave
    root (.., encoded %2e%2e, backslashes, NUL, symlinks pointing out)."""
    try:
        rel = unquote(url_path, errors="strict")
    except UnicodeError:
        return None
    if "\x00" in rel or "\\" in rel:
        return None
    parts = [p for p in rel.split("/") if p]
    if any(p in (".", "..") for p in parts):
        return None
    if not parts:
        parts = ["index.html"]
    try:
        root = root.resolve()
        cand = root.joinpath(*parts)
        if cand.is_dir():
            cand = cand / "index.html"
        real = cand.resolve(strict=True)
    except (OSError, RuntimeError, UnicodeError):
        return None
    if not real.is_relative_to(root) or not real.is_file():
        return None
    return real
