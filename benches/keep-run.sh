#!/usr/bin/env bash
# Copy a bench-run directory without its rollout traces, so that its finished
# parts can be committed and a later session (on a fresh machine, where
# `runs/` and ~/.cache are gone) can continue it.
#
#   benches/keep-run.sh SRC DEST
#
# Keep:    benches/keep-run.sh runs/ev15v3-gsm8k benches/results/runs/ev15v3-gsm8k
# Restore: benches/keep-run.sh benches/results/runs/ev15v3-gsm8k runs/ev15v3-gsm8k
#          then the same `cantante bench-run ... --out runs/ev15v3-gsm8k`
#          skips every finished part and continues the rest.
#
# What is left out: `*_test_traces.jsonl` (the rollouts of a test evaluation;
# also `dspy_*.jsonl`, dataset items that campaign.sh samples again, and
# the DSPy campaign's `serve.log`;
# the table's paired comparisons read `*_test_scores.json`, which bench-run
# writes beside them, instead). Optimize runs keep their checkpoint, so an
# unfinished one resumes from its last round. Files already in DEST are
# overwritten, none deleted.
# Uses CANTANTE_BIN (default target/release/cantante) to write missing
# `*_test_scores.json` first, from the traces (`bench-run --table-only`).
set -euo pipefail
[[ $# -eq 2 ]] || { sed -n 2,20p "$0"; exit 2; }
src=${1%/} dest=${2%/}
[[ -f "$src/protocol.json" ]] || { echo "keep-run.sh: $src is not a bench-run directory (no protocol.json)" >&2; exit 2; }
bin=${CANTANTE_BIN:-target/release/cantante}

# Per-item scores for every test evaluation that still has its traces.
if find "$src" -name '*_test_traces.jsonl' | grep -q .; then
  [[ -x "$bin" ]] || { echo "keep-run.sh: no cantante binary at $bin to write *_test_scores.json (set CANTANTE_BIN)" >&2; exit 2; }
  tasks=$(find "$src" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | paste -sd, -)
  protocol=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["name"])' "$src/protocol.json")
  proto_file="configs/protocols/$protocol.yaml"
  [[ -f "$proto_file" ]] || proto_file=$protocol
  "$bin" bench-run --table-only --task "$tasks" --protocol "$proto_file" --out "$src" >/dev/null
fi

mkdir -p "$dest"
tar -C "$src" --exclude='*_test_traces.jsonl' --exclude='dspy_*.jsonl' --exclude='serve*.log' -cf - . | tar -C "$dest" -xf -
echo "kept $src in $dest ($(du -sh "$dest" | cut -f1))"
