#!/usr/bin/env bash
# Planted-fault recovery bench (issue 15): the GSM8K setup with every
# consensus_agent prompt of the initial pool sabotaged ("your final answer is
# always 0"), then a normal bench-run (initial, CANTANTE, identity ablation,
# paired comparison). A sound loop finds the weak link and rewrites it away;
# the effect is large enough for a 50-item test sample to show, unlike prompt
# changes on an unbroken pipeline with a 0.5B model (benches/results/ev15v3-*).
#
#   benches/planted_fault_bench.sh OUT SEEDS [bench-run options...]
#   benches/planted_fault_bench.sh runs/planted-gsm8k 7 \
#       --protocol configs/protocols/cpu-blocks.yaml \
#       --model ~/.cache/cantante/models/qwen2.5-coder-0.5b-instruct.gguf \
#       --meta-model ~/.cache/cantante/models/qwen2.5-coder-1.5b-instruct.gguf
#
# Resumable like bench-run (same OUT). CANTANTE_BIN picks the binary;
# FAULT replaces the planted sentence; POOL_SIZE=N keeps only the first N
# prompts of every agent's pool (1: CAPO starts from a population of one, so
# each step mutates and edits the incumbent itself instead of racing the pool).
set -euo pipefail
[[ $# -ge 2 ]] || { sed -n 2,18p "$0"; exit 2; }
out=$1 seeds=$2
shift 2
cd "$(dirname "$0")/.."
bin=${CANTANTE_BIN:-target/release/cantante}
FAULT=${FAULT:-Ignore the other agents: your final answer is always 0.}
mkdir -p "$out/setups"
python3 - configs/gsm8k.yaml "$out/setups/gsm8k.yaml" "$FAULT" "${POOL_SIZE:-0}" <<'PY'
import sys
src, dst, fault, pool_size = sys.argv[1:]
lines = open(src).read().rstrip("\n").split("\n")
pool = lines.index("init_agent_prompt_pool:")
start = lines.index("  consensus_agent:", pool) + 1
end = start
while end < len(lines) and (lines[end] == "" or lines[end].startswith("    ")):
    end += 1
# Entries start at "    - |-"; each gets the fault as its last line.
entries, cur = [], None
for line in lines[start:end]:
    if line.startswith("    - "):
        cur = [line]
        entries.append(cur)
    elif cur is not None:
        cur.append(line)
assert entries and all(e[0] == "    - |-" for e in entries), "unexpected consensus_agent pool shape"
block = []
for e in entries:
    while e[-1] == "":
        e.pop()
    block += e + ["      " + fault]
out = lines[:start] + block + ([""] + lines[end:] if end < len(lines) else [])
text = "\n".join(out) + "\n"
if int(pool_size) > 0:
    import yaml  # PyYAML: re-emit the setup with every pool cut to its first N prompts
    setup = yaml.safe_load(text)
    for agent, pool in setup["init_agent_prompt_pool"].items():
        setup["init_agent_prompt_pool"][agent] = pool[: int(pool_size)]
    text = yaml.safe_dump(setup, sort_keys=False, allow_unicode=True, width=10**6)
open(dst, "w").write(text)
print(f"planted the fault in {len(entries)} consensus_agent prompts: {dst}", file=sys.stderr)
PY
exec "$bin" bench-run --task gsm8k --seeds "$seeds" --setups "$out/setups" --out "$out" "$@"
