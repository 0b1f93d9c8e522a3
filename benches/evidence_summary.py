#!/usr/bin/env python3
"""One table over every kept bench-run: what each evidence run of issue 15
measured, read from the `results.json` that `cantante bench-run` writes.

    python3 benches/evidence_summary.py [RUN_DIR ...] > benches/results/evidence-summary.md

Default RUN_DIRs: every `benches/results/runs/*/` with a results.json. Per run
and task: protocol, seeds, test accuracy (mean over the seeds each method
finished) of the initial prompts, CANTANTE and the identity ablation, the
paired CANTANTE-vs-initial difference (95% paired-bootstrap interval, McNemar
p), the block queries on which CANTANTE's candidate configurations beat,
lost to or tied their round's incumbent (all seeds and agents together), and
every external baseline (DSPy). Nothing here is computed anew except
the formatting: the numbers are bench-run's.
"""

import glob
import json
import os
import re
import sys

METHODS = [("initial", "initial"), ("cantante", "CANTANTE"), ("identity", "identity")]


def pct(x):
    return f"{100 * x:.1f}"


def acc_cell(row):
    if not row or not row.get("accuracy"):
        return "–"
    a = row["accuracy"]
    seeds = ",".join(str(s) for s in row["seeds"])
    spread = f" ± {pct(a['std'])}" if a.get("std") is not None and a["n"] > 1 else ""
    return f"{pct(a['mean'])}{spread} ({seeds})"


def paired_cell(stats):
    if not stats:
        return "–"
    lo, hi = stats["ci95"]
    return (f"{100 * stats['mean_diff']:+.1f} [{100 * lo:+.0f}, {100 * hi:+.0f}], "
            f"{stats['only_a']}/{stats['only_b']}, p = {stats['mcnemar_p']:.3f} (n = {stats['n']})")


def protocol_name(d):
    p = d.get("protocol")
    return p if isinstance(p, str) else (p or {}).get("name", "?")


def rows_of(path):
    d = json.load(open(path))
    run = os.path.basename(os.path.dirname(os.path.abspath(path)))
    by = {(r["task"], r["method"]): r for r in d.get("rows", [])}
    for task in sorted({r["task"] for r in d.get("rows", [])}):
        paired = next((p["stat"] for p in d.get("paired", [])
                       if p["task"] == task and p["method"] == "CANTANTE" and p["baseline"] == "Initial"), None)
        ext = "; ".join(f"{b['name']} {pct(b['accuracy']['mean'])} ({','.join(map(str, b['seeds']))})"
                        for b in d.get("baselines", []) if b["task"] == task) or "–"
        accs = [acc_cell(by.get((task, m))) for m, _ in METHODS]
        if all(a == "–" for a in accs):
            continue  # a directory bench-run listed as a task but with no evaluation in it
        cands = [c["outcomes"] for c in d.get("candidates", []) if c["task"] == task]
        flips = (f"{sum(o['won'] for o in cands)} / {sum(o['lost'] for o in cands)} / "
                 f"{sum(o['tied'] for o in cands)}") if cands else "–"
        yield [run, protocol_name(d), task] + accs + [paired_cell(paired), flips, ext]


def natural(path):
    """ev15v3 before ev15v10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def main():
    paths = [os.path.join(a, "results.json") for a in sys.argv[1:]] or sorted(
        glob.glob(os.path.join(os.path.dirname(__file__), "results", "runs", "*", "results.json")), key=natural)
    head = ["run", "protocol", "task"] + [f"{label} acc % (seeds)" for _, label in METHODS] + [
        "CANTANTE − initial, points [95% CI], only C / only I, McNemar",
        "CANTANTE candidates vs incumbent: queries won / lost / tied", "external baselines, acc % (seeds)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for path in paths:
        if not os.path.isfile(path):
            sys.exit(f"evidence_summary.py: no results.json at {path}")
        for row in rows_of(path):
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
