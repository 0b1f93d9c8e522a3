#!/usr/bin/env bash
# DSPy baselines (MIPROv2, GEPA) for the seeds of a finished bench-run
# directory, each with an optimization budget sized from that seed's CANTANTE
# run, then the bench-run table rebuilt with them (resumable: a seed whose
# dspy_<optimizer>.json exists is skipped).
#
#   benches/dspy/install.sh        # once
#   benches/dspy/campaign.sh OUT TASK SEEDS MODEL [OPTIMIZERS]   (mipro, gepa, none)
#   benches/dspy/campaign.sh runs/ev15v2-gsm8k gsm8k 7,42,47 \
#       ~/.cache/cantante/models/qwen2.5-coder-0.5b-instruct.gguf mipro,gepa
#
# OUT must hold `OUT/TASK/seed<S>/cantante/summary.json` and
# `initial_test.json` (a bench-run with CANTANTE finished). Budget: CANTANTE's
# optimization tokens B (task, validation, attribution and rewrite) and the
# initial test evaluation's tokens per query q give GEPA 0.8·B/q metric calls
# (one call = one pipeline rollout; the rest is left for its reflection
# calls) and MIPROv2 0.7·B/(10·q) trials (minibatches of 10 plus its
# bootstrapping and instruction proposals). These are estimates: the table
# reports the tokens each baseline actually spent (the server's `usage`).
# The run's own settings come from OUT/protocol.json (what bench-run recorded):
# dev and test sizes, the task model's temperature and its new-token limit per
# turn, so a greedy protocol gets greedy baselines on the same items.
# Every model call of a baseline (messages, reply, usage) is kept beside its
# result in dspy_<optimizer>_history.jsonl (keep-run.sh leaves it out).
# META_MODEL (a GGUF path; CANTANTE's --meta-model) gives the optimizers the
# meta model CANTANTE had: a second `cantante serve` on PORT+1 writes MIPROv2's
# instruction proposals and GEPA's reflections, with the protocol's
# meta_max_new_tokens and meta_temperature; results go to
# dspy_<optimizer>_meta.json (a row of their own in the table), so runs with
# and without it sit side by side. Without it the task model writes them.
# Environment: CANTANTE_DATA (the datasets, as for every cantante command), CANTANTE_BIN (default target/release/cantante), PORT (8090),
# MAX_BATCH (64), MAX_TOKENS / TEMPERATURE (override the recorded protocol's),
# CANTANTE_DSPY_VENV, PROTOCOL (for the table; default
# configs/protocols/<recorded name>.yaml, else the recorded name).
set -euo pipefail
[[ $# -ge 4 ]] || { sed -n 2,28p "$0"; exit 2; }
out=$1 task=$2 seeds=$3 model=$4 optimizers=${5:-mipro,gepa}
here="$(cd "$(dirname "$0")" && pwd)"
bin=${CANTANTE_BIN:-target/release/cantante}
port=${PORT:-8090}
venv=${CANTANTE_DSPY_VENV:-$HOME/.cache/cantante/dspy-venv}
py="$venv/bin/python"
[[ -x "$py" ]] || { echo "DSPy is not installed: run benches/dspy/install.sh" >&2; exit 2; }
[[ -x "$bin" ]] || { echo "no cantante binary at $bin (cargo build --release, or set CANTANTE_BIN)" >&2; exit 2; }
[[ -f "$out/protocol.json" ]] || { echo "no $out/protocol.json: OUT must be a bench-run directory" >&2; exit 2; }
# name dev test temperature max_new_tokens meta_max_new_tokens meta_temperature,
# as bench-run recorded them for TASK.
read -r pname dev_n test_n rec_temp rec_tokens meta_tokens meta_temp < <(python3 - "$out/protocol.json" "$task" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
p = j["protocol"]
t = (p.get("tasks") or {}).get(sys.argv[2]) or {}
o = p.get("optimizer") or {}
print(j["name"], p["dev_size"], p["test_size"], p["temperature"], t.get("max_new_tokens") or p["max_new_tokens"],
      o.get("meta_max_new_tokens", 1024), o.get("meta_temperature", 0.7))
EOF
)
meta_model=${META_MODEL:-}
[[ -z "$meta_model" || -f "$meta_model" ]] || { echo "META_MODEL $meta_model is not a file" >&2; exit 2; }
suffix=${meta_model:+_meta}
temperature=${TEMPERATURE:-$rec_temp}
max_tokens=${MAX_TOKENS:-$rec_tokens}
protocol=${PROTOCOL:-configs/protocols/$pname.yaml}
[[ -n "${PROTOCOL:-}" || -f "$protocol" ]] || protocol=$pname

server="" meta_server=""
stop_server() {
  local p
  for p in $server $meta_server; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  server="" meta_server=""
}
trap stop_server EXIT

# serve MODEL PORT LOG VAR [ARGS]: start `cantante serve`, keep its pid in VAR, wait until it answers.
serve() {
  "$bin" serve --model "$1" --port "$2" --max-batch "${MAX_BATCH:-64}" "${@:5}" >"$3" 2>&1 &
  printf -v "$4" '%s' $!
  for _ in $(seq 1 120); do
    if "$py" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$2/v1/models')" 2>/dev/null; then
      return
    fi
    kill -0 "${!4}" 2>/dev/null || { echo "cantante serve exited; see $3" >&2; exit 1; }
    sleep 2
  done
  echo "cantante serve did not answer on port $2 within 4 minutes" >&2
  exit 1
}

start_server() {
  [[ -n "$server" ]] && return
  serve "$model" "$port" "$out/serve.log" server
  # Its own model name, so baseline.py can tell the two models' calls apart.
  [[ -z "$meta_model" ]] || serve "$meta_model" $((port + 1)) "$out/serve-meta.log" meta_server \
    --served-model-name cantante-meta
}

for seed in ${seeds//,/ }; do
  dir="$out/$task/seed$seed"
  summary="$dir/cantante/summary.json"
  initial="$dir/initial_test.json"
  if [[ ! -f "$summary" || ! -f "$initial" ]]; then
    echo "seed $seed: no finished CANTANTE run in $dir yet; skipped" >&2
    continue
  fi
  # B = TokenCounters::total() of the CANTANTE run; both budgets from B and q.
  read -r budget per_query mipro_trials gepa_calls < <("$py" - "$summary" "$initial" <<'EOF'
import json, sys
t = json.load(open(sys.argv[1]))["tokens"]
s = json.load(open(sys.argv[2]))["summary"]
b = sum(t.get(k, 0) for k in ("task_input", "task_output", "validation", "attribution_input",
                              "attribution_output", "rewrite_input", "rewrite_output"))
q = s["mean_input_tokens"] + s["mean_output_tokens"]
print(b, q, max(1, int(0.7 * b / (10 * q))), max(1, int(0.8 * b / q)))
EOF
)
  # The seed's items, drawn once (the bench-run draws the same ones).
  [[ -f "$dir/dspy_dev.jsonl" ]] ||
    "$bin" data sample --task "$task" --split dev --n "$dev_n" --seed "$seed" >"$dir/dspy_dev.jsonl"
  [[ -f "$dir/dspy_test.jsonl" ]] ||
    "$bin" data sample --task "$task" --split test --n "$test_n" --seed "$seed" >"$dir/dspy_test.jsonl"
  for opt in ${optimizers//,/ }; do
    result="$dir/dspy_$opt$suffix.json"
    [[ -f "$result" ]] && { echo "seed $seed $opt: done ($result)"; continue; }
    case $opt in
      gepa) knob=(--gepa-metric-calls "$gepa_calls") ;;
      mipro) knob=(--mipro-trials "$mipro_trials") ;;
      none) knob=() ;;
      *) echo "unknown optimizer $opt (mipro, gepa, none)" >&2; exit 2 ;;
    esac
    meta=()
    if [[ -n "$meta_model" ]]; then
      [[ "$opt" == none ]] && { echo "seed $seed none: no optimizer, no meta model; run it without META_MODEL"; continue; }
      meta=(--meta-api-base "http://127.0.0.1:$((port + 1))/v1" --meta-label "$(basename "$meta_model" .gguf)"
            --meta-max-tokens "$meta_tokens" --meta-temperature "$meta_temp")
    fi
    echo "seed $seed $opt: CANTANTE spent $budget tokens ($per_query per query): ${knob[*]}; temperature $temperature, $max_tokens new tokens per turn${meta_model:+; meta model $meta_model}"
    start_server
    "$py" "$here/baseline.py" --task "$task" --api-base "http://127.0.0.1:$port/v1" \
      --dev "$dir/dspy_dev.jsonl" --test "$dir/dspy_test.jsonl" --seed "$seed" \
      --max-tokens "$max_tokens" --temperature "$temperature" --optimizer "$opt" "${knob[@]}" "${meta[@]}" \
      --out "$result.tmp" --history "$dir/dspy_${opt}${suffix}_history.jsonl"
    mv "$result.tmp" "$result"
  done
done
stop_server
"$bin" bench-run --task "$task" --protocol "$protocol" \
  --seeds "$seeds" --out "$out" --table-only
