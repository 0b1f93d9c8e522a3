#!/usr/bin/env bash
# One-command setup on a fresh machine (idempotent, cached):
# the default + smoke models, a release build, and the benchmark data.
#   ./setup.sh            (add `large` to also fetch Qwen2.5-Coder-1.5B-Instruct)
set -euo pipefail
cd "$(dirname "$0")"
models/fetch.sh all
if [[ "${1:-}" == "large" ]]; then models/fetch.sh large; fi
cargo build --release
target/release/cantante data fetch
echo "setup done: models in ${CANTANTE_MODELS:-$HOME/.cache/cantante/models}, data in ${CANTANTE_DATA:-datasets/}"
