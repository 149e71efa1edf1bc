"""The router's models from the local Hugging Face cache, as llama-server lists them: each GGUF
of a cached repository's current snapshot is the model `owner/name:TAG` (TAG from the file name,
`model-Q4_K_M.gguf` -> `Q4_K_M`; the first shard of a split model), `source: "cache"`, and
`DELETE /models?model=...` removes its files from the cache. Nothing is downloaded here.

The cache is llama.cpp's: `$LLAMA_CACHE`, else `$HF_HUB_CACHE`, `$HUGGINGFACE_HUB_CACHE`,
`$HF_HOME/hub`, `$XDG_CACHE_HOME/huggingface/hub`, `~/.cache/huggingface/hub`; its layout is
Hugging Face's: `models--OWNER--NAME/refs/main` (the commit), `snapshots/COMMIT/FILE` (links
into `blobs/`).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

log = logging.getLogger("server.router")

CACHE_ENV = (("LLAMA_CACHE", ""), ("HF_HUB_CACHE", ""), ("HUGGINGFACE_HUB_CACHE", ""),
             ("HF_HOME", "hub"), ("XDG_CACHE_HOME", os.path.join("huggingface", "hub")))
NOT_MODELS = ("mmproj", "mtp-", "eagle3-", "dflash-", "dspark-")  # projectors and draft heads
_SPLIT = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", re.I)
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.I)
_REPO = re.compile(r"^[A-Za-z0-9_]+(?:[./-][A-Za-z0-9_]+)*$")
_COMMIT = re.compile(r"^[0-9a-fA-F]{40}$")


def cache_dir() -> str:
    for var, sub in CACHE_ENV:
        value = os.environ.get(var)
        if value:
            return os.path.join(value, sub) if sub else value
    return os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")


@dataclass(frozen=True)
class CachedFile:
    repo_id: str      # owner/name
    tag: str          # upper case, "" when the name has none
    index: int        # the shard's number (1 when not split)
    path: str         # the snapshot's entry (often a link into blobs/)


def split_info(name: str) -> tuple[str, int] | None:
    """(TAG, shard index) of a GGUF file name, as llama.cpp reads them; None for other files."""
    if not name.lower().endswith(".gguf"):
        return None
    prefix, index = name[:-len(".gguf")], 1
    m = _SPLIT.match(prefix)
    if m:
        prefix, index = m.group(1), int(m.group(2))
    t = _TAG.search(prefix)
    return (t.group(1).upper() if t else ""), index


def _commit(repo_path: str) -> str:
    """The snapshot in use: refs/main, else the first other ref."""
    refs = os.path.join(repo_path, "refs")
    try:
        names = sorted(os.listdir(refs), key=lambda n: n != "main")
    except OSError:
        return ""
    for name in names:
        try:
            with open(os.path.join(refs, name), encoding="utf-8") as f:
                commit = f.readline().strip()
        except (OSError, UnicodeDecodeError):
            continue
        if _COMMIT.match(commit):
            return commit
    return ""


def cached_files(repo_id: str | None = None) -> list[CachedFile]:
    root = cache_dir()
    try:
        folders = sorted(os.listdir(root))
    except OSError:
        return []
    out = []
    for folder in folders:
        if not folder.startswith("models--"):
            continue
        rid = folder[len("models--"):].replace("--", "/")
        if rid.count("/") != 1 or not _REPO.match(rid) or (repo_id and rid != repo_id):
            continue
        commit = _commit(os.path.join(root, folder))
        snap = os.path.join(root, folder, "snapshots", commit)
        if not commit or not os.path.isdir(snap):
            continue
        for dirpath, _dirs, files in os.walk(snap):
            for fname in sorted(files):
                info = split_info(fname)
                if info is not None:
                    out.append(CachedFile(rid, info[0], info[1], os.path.join(dirpath, fname)))
    return out


def cached_models() -> dict[str, str]:
    """{"owner/name:TAG": the GGUF to load (its first shard)} of the cache."""
    out: dict[str, str] = {}
    for f in cached_files():
        base = os.path.basename(f.path).lower()
        if f.index == 1 and f.tag and not any(base.startswith(p) or p in base for p in NOT_MODELS):
            out.setdefault(f"{f.repo_id}:{f.tag}", f.path)
    return out


def resolve(hf_repo: str) -> str:
    """A preset's `hf-repo = owner/name[:TAG]` when the cache holds it (the GGUF's path), else "";
    without a tag, Q4_K_M if there is one, else the first model of the repository."""
    repo, _, tag = hf_repo.partition(":")
    found = {n.partition(":")[2]: p for n, p in cached_models().items() if n.partition(":")[0] == repo}
    if tag:
        return found.get(tag.upper(), "")
    return found.get("Q4_K_M") or next(iter(found.values()), "")


def remove(name: str) -> bool:
    """Delete `owner/name:TAG`'s files (every shard) from the cache, and the blobs no other
    snapshot entry links to. Only files inside the repository's cache folder are removed: a
    link's target elsewhere is left alone. False when nothing was there."""
    repo, _, tag = name.partition(":")
    files = [f for f in cached_files(repo) if f.tag == tag.upper()]
    if not files:
        return False
    repo_path = os.path.realpath(os.path.join(cache_dir(), "models--" + repo.replace("/", "--")))
    blobs = set()
    for f in files:
        if os.path.islink(f.path):
            blobs.add(os.path.normpath(os.path.join(os.path.dirname(f.path), os.readlink(f.path))))
        os.unlink(f.path)
    kept = {os.path.normpath(os.path.join(os.path.dirname(f.path), os.readlink(f.path)))
            for f in cached_files(repo) if os.path.islink(f.path)}
    for blob in blobs - kept:
        inside = os.path.realpath(os.path.dirname(blob)) == os.path.join(repo_path, "blobs")
        if inside and (os.path.islink(blob) or os.path.isfile(blob)):
            os.unlink(blob)  # a link is removed, never what it points to
    log.info("removed %s from the Hugging Face cache (%d files)", name, len(files))
    return True
