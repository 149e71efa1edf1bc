"""The libllama builds a benchmark can put both sides on, so that a ratio measures the code.

Two builds of llama.cpp v0.5.0, each used by ours and by the C++ programs alike:

- ``native``: the cmake build of the fetched source in .llama/cpp-build (GGML_NATIVE, OpenMP on:
  what llama-server runs on when built here). Ours runs with LLAMA_LIB_DIR=.llama/cpp-build/bin.
- ``prebuilt``: the npm library that scripts/fetch_llama.sh installs in .llama/lib (OpenMP off,
  one dynamic CPU backend per ISA family). Ours loads it by default. The C++ programs compiled in
  .llama/cpp-build are copied into .llama/cpp-on-prebuilt/ beside links to the prebuilt libraries
  under the names the programs ask for (libllama.so.0, libggml.so.0, ...) and run there with
  LD_LIBRARY_PATH pointing at it: the same headers and version, but every computation in the very
  library files ours loads (ggml picks its CPU backend from the executable's folder).

``process_build(pid)`` reads which files a running process actually mapped, so every report says
what each side ran on, not what it was told to run on.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOT = ROOT / ".llama"
CPP_BUILD = DOT / "cpp-build"
PREBUILT_LIB = DOT / "lib"
SHIM = DOT / "cpp-on-prebuilt"
PROGRAMS = ("llama-server", "llama-parallel")
NAMES = ("native", "prebuilt")


@dataclass
class Build:
    name: str
    lib_dir: Path            # LLAMA_LIB_DIR for our programs
    bin_dir: Path            # where the C++ programs run from
    cpp_env: dict = field(default_factory=dict)  # extra environment of the C++ programs

    def program(self, name: str) -> Path:
        return self.bin_dir / name

    def env_ours(self, base: dict | None = None) -> dict:
        return dict(base if base is not None else os.environ, LLAMA_LIB_DIR=str(self.lib_dir))

    def env_cpp(self, base: dict | None = None) -> dict:
        return {**(base if base is not None else os.environ), **self.cpp_env}


def _needed(binary: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)


def _prebuilt_file(needed: str) -> Path | None:
    """The prebuilt library that stands for a cmake library name such as libllama.so.0."""
    stem = re.sub(r"\.so(\.\d+)*$", "", needed)  # libllama, libggml, libggml-base, libllama-common
    for cand in (f"{stem}.v0.5.0.so", f"{stem}.so"):
        if (PREBUILT_LIB / cand).exists():
            return PREBUILT_LIB / cand
    return None


def _make_shim() -> None:
    """Fill .llama/cpp-on-prebuilt: the C++ programs beside links to the prebuilt libraries.

    Walks the programs' NEEDED libraries: libllama, libggml and libggml-base are the prebuilt
    ones; the programs' own code (libllama-common, libmtmd, libllama-server-impl, ...) stays the
    one compiled in .llama/cpp-build."""
    SHIM.mkdir(parents=True, exist_ok=True)
    for p in SHIM.iterdir():
        p.unlink()
    todo = [CPP_BUILD / "bin" / prog for prog in PROGRAMS]
    for src in todo:
        if not src.exists():
            raise SystemExit(f"error: {src} is missing; build the C++ programs first")
    for prog in PROGRAMS:  # a copy: ggml looks for its backends beside the real executable
        shutil.copy2(CPP_BUILD / "bin" / prog, SHIM / prog)
    seen: set[str] = set()
    while todo:
        for needed in _needed(todo.pop()):
            if needed in seen or not needed.startswith(("libllama", "libggml", "libmtmd")):
                continue
            seen.add(needed)
            target = _prebuilt_file(needed) if needed.startswith(
                ("libllama.so", "libggml.so", "libggml-base.so")) else None
            if target is None:
                target = (CPP_BUILD / "bin" / needed).resolve()
                todo.append(target)
            (SHIM / needed).symlink_to(target)
    for backend in PREBUILT_LIB.glob("libggml-cpu-*.so"):
        (SHIM / backend.name).symlink_to(backend)


def get(name: str) -> Build:
    """The named build, ready to run (the C++ programs must have been built in .llama/cpp-build)."""
    if name == "native":
        return Build("native", CPP_BUILD / "bin", CPP_BUILD / "bin")
    if name == "prebuilt":
        stale = any(not (SHIM / p).exists()
                    or (SHIM / p).stat().st_mtime < (CPP_BUILD / "bin" / p).stat().st_mtime
                    for p in PROGRAMS if (CPP_BUILD / "bin" / p).exists())
        if stale or not SHIM.exists():
            _make_shim()
        return Build("prebuilt", PREBUILT_LIB, SHIM, {"LD_LIBRARY_PATH": str(SHIM)})
    raise ValueError(f"unknown build {name!r}; choose from {', '.join(NAMES)}")


def process_build(pid: int) -> dict:
    """Which libllama, CPU backend and threading runtime a running process has mapped."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return {}
    files = sorted({line.split()[-1] for line in maps.splitlines()
                    if "/" in line and ".so" in line})
    llama = [f for f in files if re.search(r"/libllama(\.v[\d.]+)?\.so", f)]
    cpu = [Path(f).name for f in files if re.search(r"/libggml-cpu[\w.-]*\.so", f)]
    return {
        "libllama": llama[0] if llama else None,
        "openmp": any("libgomp" in f for f in files),
        "cpu_backend": ",".join(cpu) or "built into libggml",
    }


def describe(info: dict) -> str:
    if not info:
        return "(process gone)"
    lib = info["libllama"] or "?"
    try:
        lib = str(Path(lib).relative_to(ROOT))
    except ValueError:
        pass
    return f"{lib}, OpenMP {'on' if info['openmp'] else 'off'}, CPU backend {info['cpu_backend']}"


def stop_all(procs, sig: int = signal.SIGTERM) -> None:
    """Signal every server at once, then wait for each (killed after 30 s)."""
    procs = list(procs)
    for p in procs:
        p.send_signal(sig)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
