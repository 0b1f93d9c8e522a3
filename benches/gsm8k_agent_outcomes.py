#!/usr/bin/env python3
"""Did a GSM8K executor's candidate prompt make that executor itself more
often right, even where the consensus vote hid it from the system score?

    CANTANTE_DATA=../shared/datasets python3 benches/gsm8k_agent_outcomes.py RUN_DIR [SEED ...]

RUN_DIR is a kept bench-run directory (e.g. benches/results/runs/ev15v10-gsm8k);
seeds default to 7 42 47. For every `ofat` configuration of the CANTANTE
run's rounds that changed exactly one executor, and every query of its
block, it compares that executor's own proposal with the gold answer, in
the candidate configuration and in the round's incumbent (both read from the
checkpoint's rollout cache), and counts wins / losses / ties at the agent
level beside the system-level ones. A second table counts, over every cached
block rollout, how many of the three executors were right against whether
the system was. Uses CANTANTE_BIN (default target/release/cantante) to draw
the seed's dev items (`cantante data sample`).
"""

import collections
import json
import os
import re
import subprocess
import sys

import yaml


def number(text):
    """The last number in a proposal (commas dropped), or None."""
    found = re.findall(r"-?\d+(?:\.\d+)?", str(text).replace(",", ""))
    return float(found[-1]) if found else None


def right(value, gold):
    return value is not None and gold is not None and abs(value - gold) < 1e-6


def dev_items(seed, n):
    out = subprocess.run(
        [os.environ.get("CANTANTE_BIN", "target/release/cantante"), "data", "sample",
         "--task", "gsm8k", "--split", "dev", "--n", str(n), "--seed", str(seed)],
        capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    run = sys.argv[1]
    seeds = [int(s) for s in sys.argv[2:]] or [7, 42, 47]
    outcome = collections.Counter()
    votes = collections.Counter()
    for seed in seeds:
        opt = os.path.join(run, "gsm8k", f"seed{seed}", "cantante")
        ckpt = yaml.safe_load(open(os.path.join(opt, "checkpoint.yaml")))
        # Cache keys are `<config hash prefix>:<dev index>:<seed>`; seeded
        # samples are prefixes, so the first max-index + 1 items are the run's.
        cache = {}
        for key, value in ckpt["cache"].items():
            h, q, _ = key.split(":")
            cache[(h, int(q))] = value
        dev = dev_items(seed, max(q for _, q in cache) + 1)

        def rollout(full_hash, q):
            return next((r for (h, i), r in cache.items() if i == q and full_hash.startswith(h)), None)

        for (h, q), r in cache.items():
            gold = number(dev[q]["target"])
            n = sum(right(number(r["agent_outputs"].get(f"executor_{i}", {}).get(f"proposal_{i}")), gold)
                    for i in (1, 2, 3))
            votes[(n, r["score"])] += 1
        for line in open(os.path.join(opt, "rounds.jsonl")):
            rec = json.loads(line)
            incumbent = rec["config_hashes"][0]
            for c, changed in enumerate(rec["changed"]):
                if len(changed) != 1 or not changed[0].startswith("executor_"):
                    continue
                agent, i = changed[0], changed[0][-1]
                for q in rec["block"]:
                    a, b = rollout(incumbent, q), rollout(rec["config_hashes"][c], q)
                    if a is None or b is None:
                        outcome["missing"] += 1
                        continue
                    gold = number(dev[q]["target"])
                    ok_a = right(number(a["agent_outputs"][agent].get(f"proposal_{i}")), gold)
                    ok_b = right(number(b["agent_outputs"][agent].get(f"proposal_{i}")), gold)
                    outcome[("agent", (ok_b > ok_a) - (ok_b < ok_a))] += 1
                    outcome[("system", (b["score"] > a["score"]) - (b["score"] < a["score"]))] += 1
    print(f"# {run}, seeds {', '.join(map(str, seeds))}\n")
    print("One executor's candidate against the incumbent, per block query:\n")
    print("| level | won | lost | tied |\n|---|---|---|---|")
    for level in ("agent", "system"):
        print(f"| {level} | {outcome[(level, 1)]} | {outcome[(level, -1)]} | {outcome[(level, 0)]} |")
    if outcome["missing"]:
        print(f"\n{outcome['missing']} comparisons had a rollout missing from the cache.")
    print("\nEvery cached block rollout: executors right against the system score:\n")
    print("| executors right | system right | system wrong |\n|---|---|---|")
    for n in range(4):
        print(f"| {n} | {votes[(n, 1.0)]} | {votes[(n, 0.0)]} |")


if __name__ == "__main__":
    main()
