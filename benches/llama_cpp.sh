#!/usr/bin/env bash
# Install a pinned llama-cpp-python (built from source for this CPU) into a cache
# venv, then run the engine bench's workload through it:
#
#   benches/llama_cpp.sh setup                 # once; builds llama.cpp (several minutes)
#   benches/llama_cpp.sh run MODEL.gguf WORKLOAD.json THREADS
#
# `run` prints one JSON line per measurement ({"kind": "decode", "batch": 8,
# "tok_s": ...} and {"kind": "prefill", "tokens": ..., "tok_s": ...}); the engine
# bench (`cargo bench --bench engine`) calls it and prints the ratio. Venv:
# $CANTANTE_LLAMA_VENV, else ~/.cache/cantante/llama-cpp-venv.
set -euo pipefail
VERSION=0.3.36
venv="${CANTANTE_LLAMA_VENV:-$HOME/.cache/cantante/llama-cpp-venv}"
here="$(cd "$(dirname "$0")" && pwd)"

case "${1:-}" in
  setup)
    if "$venv/bin/python" -c "import llama_cpp; assert llama_cpp.__version__ == '$VERSION'" 2>/dev/null; then
      echo "llama-cpp-python $VERSION already installed in $venv"; exit 0
    fi
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    # GGML_NATIVE: kernels for this CPU (AVX2 / AVX-512 / VNNI as present).
    CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$venv/bin/pip" install --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
    "$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'installed in $venv')"
    ;;
  run)
    [[ -x "$venv/bin/python" ]] || { echo "llama.cpp absent: run benches/llama_cpp.sh setup" >&2; exit 2; }
    shift
    exec "$venv/bin/python" "$here/llama_cpp_bench.py" "$@"
    ;;
  *)
    echo "usage: benches/llama_cpp.sh setup | run MODEL.gguf WORKLOAD.json THREADS" >&2; exit 2 ;;
esac
