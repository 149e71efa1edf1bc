"""Find, load and version-check libllama, and route its log into Python `logging`."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from . import _bindings as B

log = logging.getLogger("llama_lib")
log.addHandler(logging.NullHandler())  # a library logs only where the application asks it to
cpp_log = logging.getLogger("llama_lib.cpp")

# The checkout's fetch folder, filled by scripts/fetch_llama.sh.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
FETCH_DIR = PROJECT_ROOT / ".llama"
DEFAULT_LIB_DIR = FETCH_DIR / "lib"
DEFAULT_MODEL = FETCH_DIR / "models" / "gemma-3-270m-q4_k_m.gguf"
FETCH_HINT = "run `bash scripts/fetch_llama.sh` from the project root"

# File names of the two layouts we accept: the prebuilt npm package and a cmake build.
_LAYOUTS = {
    "prebuilt": ("libggml-base.so", "libggml.v0.5.0.so", "libllama.v0.5.0.so"),
    "cmake": ("libggml-base.so", "libggml.so", "libllama.so"),
}


class LlamaLibraryError(RuntimeError):
    """The library could not be found, loaded, or is of the wrong version."""


@dataclass(frozen=True)
class BuildInfo:
    """How the loaded libllama was built, as far as it matters for speed and for comparisons.

    openmp: ggml's CPU backend runs its threads with OpenMP (the default of a cmake build);
    without it (the prebuilt npm library) ggml runs its own worker threads, which a persistent
    thread pool keeps alive between decodes. cpu_backend: the file of the CPU backend in use
    (e.g. libggml-cpu-haswell.so, one of the prebuilt variants, or a cmake build's libggml-cpu.so).
    """

    lib_dir: Path
    layout: str
    openmp: bool
    cpu_backend: str
    features: str

    def describe(self) -> str:
        return (f"{self.lib_dir} ({self.layout}, OpenMP {'on' if self.openmp else 'off'}, "
                f"CPU backend {self.cpu_backend})")


def _loaded_cpu_backend() -> str:
    """The ggml CPU backend library mapped into this process (read from /proc/self/maps)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    names = sorted(set(re.findall(r"/(libggml-cpu[\w.-]*\.so[\w.]*)$", maps, re.M)))
    return ",".join(names) or "built into libggml"


class Library:
    """A loaded libllama with its functions declared; `.llama` and `.ggml` are the CDLLs."""

    def __init__(self, lib_dir: Path, layout: str, llama: ctypes.CDLL, ggml: ctypes.CDLL):
        self.lib_dir = lib_dir
        self.layout = layout
        self.llama = llama
        self.ggml = ggml
        self.version = llama.llama_version().decode()
        self._cpu_functions: dict[str, object] = {}
        self._build_info: BuildInfo | None = None

    def cpu_function(self, name: str):
        """A function of ggml's CPU backend (ggml-cpu.h), or None when it does not export it.

        The CPU backend is a plugin loaded at run time, so its functions have no symbol in the
        libraries loaded here; they are looked up through the backend registry instead."""
        if name not in self._cpu_functions:
            fn = None
            reg = self.ggml.ggml_backend_reg_by_name(b"CPU")
            addr = self.ggml.ggml_backend_reg_get_proc_address(reg, name.encode()) if reg else None
            if addr:
                fn = B.prototype(B.GGML_CPU_FUNCTIONS, name)(addr)
            self._cpu_functions[name] = fn
        return self._cpu_functions[name]

    @property
    def build_info(self) -> BuildInfo:
        if self._build_info is None:
            features = self.llama.llama_print_system_info().decode()
            self._build_info = BuildInfo(
                lib_dir=self.lib_dir, layout=self.layout,
                openmp=re.search(r"\bOPENMP = 1\b", features) is not None,
                cpu_backend=_loaded_cpu_backend(), features=features.strip())
        return self._build_info

    def __repr__(self) -> str:
        return f"Library(version={self.version!r}, dir={str(self.lib_dir)!r}, layout={self.layout!r})"


_loaded: Library | None = None
_load_lock = threading.Lock()


def default_model_path() -> Path:
    """`LLAMA_MODEL` if set, else the model the fetch script puts in the fetch folder."""
    env = os.environ.get("LLAMA_MODEL")
    return Path(env) if env else DEFAULT_MODEL


def _resolve_dir(lib_dir: str | os.PathLike | None) -> Path:
    if lib_dir is not None:
        return Path(lib_dir)
    env = os.environ.get("LLAMA_LIB_DIR")
    if env:
        return Path(env)
    return DEFAULT_LIB_DIR


def _detect_layout(folder: Path) -> str:
    for name, files in _LAYOUTS.items():
        if all((folder / f).exists() for f in files):
            return name
    found = sorted(p.name for p in folder.glob("*.so*")) if folder.is_dir() else []
    expected = " or ".join(", ".join(f) for f in _LAYOUTS.values())
    raise LlamaLibraryError(
        f"no libllama in {folder}: found {found or 'nothing'}, expected {expected}. "
        f"Fix: {FETCH_HINT}, or set LLAMA_LIB_DIR to a folder holding libllama v{B.HEADER_VERSION}."
    )


def _version_ok(version: str) -> bool:
    # Builds of the pinned tag report "0.5.0" or "0.5.0-<suffix>" (the npm build says "0.5.0-dev").
    return version == B.HEADER_VERSION or version.startswith(B.HEADER_VERSION + "-")


@B.ggml_log_callback
def _log_callback(level: int, text: bytes | None, _user: int | None) -> None:
    if not text:
        return
    msg = text.decode("utf-8", "replace").rstrip("\n")
    if not msg:
        return
    py_level = {
        B.GGML_LOG_LEVEL_DEBUG: logging.DEBUG,
        B.GGML_LOG_LEVEL_INFO: logging.DEBUG,  # llama.cpp is chatty at INFO; keep it out of the way
        B.GGML_LOG_LEVEL_WARN: logging.WARNING,
        B.GGML_LOG_LEVEL_ERROR: logging.ERROR,
    }.get(level, logging.DEBUG)
    cpp_log.log(py_level, "%s", msg)


def load_library(lib_dir: str | os.PathLike | None = None) -> Library:
    """Load libllama once per process: explicit folder, then `LLAMA_LIB_DIR`, then `.llama/lib`.

    Loads ggml's CPU backend plugins from the same folder (nothing computes without them) and
    refuses any libllama whose `llama_version()` is not the version the bindings were written for.
    """
    global _loaded
    with _load_lock:
        folder = _resolve_dir(lib_dir).resolve()
        if _loaded is not None:
            if folder != _loaded.lib_dir:
                raise LlamaLibraryError(
                    f"libllama is already loaded from {_loaded.lib_dir}; cannot also load {folder} "
                    "in the same process"
                )
            return _loaded
        if not folder.is_dir():
            raise LlamaLibraryError(
                f"libllama folder {folder} does not exist. Fix: {FETCH_HINT}, "
                "or set LLAMA_LIB_DIR to a folder holding the library."
            )
        layout = _detect_layout(folder)
        base_name, ggml_name, llama_name = _LAYOUTS[layout]
        try:
            ctypes.CDLL(str(folder / base_name), mode=ctypes.RTLD_GLOBAL)
            ggml = ctypes.CDLL(str(folder / ggml_name), mode=ctypes.RTLD_GLOBAL)
            llama = ctypes.CDLL(str(folder / llama_name), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise LlamaLibraryError(
                f"could not load libllama from {folder} ({layout} layout): {e}. "
                f"Fix: {FETCH_HINT} to replace the files."
            ) from e
        try:
            B.declare(llama, {"llama_version": B.LLAMA_FUNCTIONS["llama_version"]})
            version = llama.llama_version().decode()
        except AttributeError as e:
            raise LlamaLibraryError(
                f"{folder / llama_name} is not libllama ({e}). Fix: {FETCH_HINT}, or point "
                f"LLAMA_LIB_DIR at a folder holding libllama v{B.HEADER_VERSION}."
            ) from e
        if not _version_ok(version):
            raise LlamaLibraryError(
                f"{folder / llama_name} is libllama version {version!r}, but these bindings were "
                f"written for llama.h of version {B.HEADER_VERSION!r}; calling it could crash. "
                f"Fix: {FETCH_HINT} (or point LLAMA_LIB_DIR at a v{B.HEADER_VERSION} build)."
            )
        try:
            B.declare(llama, B.LLAMA_FUNCTIONS)
            B.declare(ggml, B.GGML_FUNCTIONS)
            B.declare(ggml, B.GGML_BASE_FUNCTIONS)  # found through libggml's dependency
        except AttributeError as e:
            raise LlamaLibraryError(f"{folder / llama_name} lacks a v{version} function: {e}") from e

        llama.llama_log_set(_log_callback, None)
        ggml.ggml_backend_load_all_from_path(str(folder).encode())
        if ggml.ggml_backend_dev_count() == 0:
            raise LlamaLibraryError(
                f"no ggml compute backend could be loaded from {folder} (no libggml-cpu-*.so for "
                f"this CPU?). Fix: {FETCH_HINT} --from-source"
            )
        llama.llama_backend_init()
        _loaded = Library(folder, layout, llama, ggml)
        log.debug("loaded %r", _loaded)
        return _loaded


def library() -> Library:
    """The loaded Library, loading it from the default place on first use."""
    return _loaded or load_library()


def lib() -> ctypes.CDLL:
    """The libllama CDLL, loading it from the default place on first use."""
    return (_loaded or load_library()).llama


def system_info() -> str:
    return lib().llama_print_system_info().decode()


def build_info() -> BuildInfo:
    """How the loaded libllama was built (OpenMP or not, which CPU backend), loading it first."""
    return library().build_info


COMMON_LIB = "libllama-common.so"  # llama.cpp's common library: both layouts ship it beside libllama


def llama_build_info(lib_dir: str | os.PathLike | None = None) -> str:
    """llama.cpp's build tag, "b<LLAMA_BUILD_NUMBER>-<LLAMA_COMMIT>" (what its llama_build_info()
    gives and llama-server reports as build_info and system_fingerprint), read from the
    libllama-common.so beside the libllama in use (the loaded one, else where load_library would
    look). Does not load the model backends; "b0-unknown" (cmake's defaults) without that file."""
    folder = _loaded.lib_dir if _loaded is not None else _resolve_dir(lib_dir).resolve()
    return _read_build_tag(folder)


@functools.cache
def _read_build_tag(folder: Path) -> str:
    try:
        common = ctypes.CDLL(str(folder / COMMON_LIB))
        number = ctypes.c_int.in_dll(common, "LLAMA_BUILD_NUMBER").value
        commit = (ctypes.c_char_p.in_dll(common, "LLAMA_COMMIT").value or b"unknown").decode()
    except (OSError, ValueError) as e:
        log.debug("no build number and commit from %s: %s", folder / COMMON_LIB, e)
        return "b0-unknown"
    return f"b{number}-{commit}"
