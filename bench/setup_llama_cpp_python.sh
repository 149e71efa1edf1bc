#!/usr/bin/env bash
# Install llama-cpp-python (with its OpenAI-compatible server) into a cached,
# gitignored virtualenv, .llama/venv-lcp, for bench/scaling.py to compare against.
#
#   bash bench/setup_llama_cpp_python.sh          # idempotent: skips when installed
#
# llama-cpp-python builds its own llama.cpp from the sdist with cmake (10-20 min on 2 cores).
# Environment overrides: LCP_VERSION (default 0.3.36), LCP_VENV (default .llama/venv-lcp),
# CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL (default 2), PYTHON (default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${LCP_VERSION:-0.3.36}"
VENV="${LCP_VENV:-$ROOT/.llama/venv-lcp}"
PY="${PYTHON:-python3}"

if [ -x "$VENV/bin/python" ] && \
   "$VENV/bin/python" -c "import importlib.metadata as m, sys; \
sys.exit(0 if m.version('llama_cpp_python') == '$VERSION' else 1)" 2>/dev/null && \
   "$VENV/bin/python" -c "import llama_cpp.server, uvicorn, sse_starlette" 2>/dev/null; then
    echo "llama-cpp-python $VERSION already installed in $VENV"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip

export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
echo "building llama-cpp-python $VERSION (CMAKE_ARGS=$CMAKE_ARGS, -j$CMAKE_BUILD_PARALLEL_LEVEL); this takes a while"
"$VENV/bin/python" -m pip install --no-cache-dir --verbose "llama-cpp-python[server]==$VERSION"
"$VENV/bin/python" -c "import llama_cpp, llama_cpp.server; print('llama-cpp-python', llama_cpp.__version__, 'ok')"
