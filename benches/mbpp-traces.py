#!/usr/bin/env python3
"""Where an MBPP pipeline run loses items, from its traces.

    benches/mbpp-traces.py TRACES.jsonl [MBPP.jsonl]

TRACES.jsonl: `cantante eval --out DIR` writes DIR/traces.jsonl (bench-run
writes <method>_test_traces.jsonl). MBPP.jsonl: the dataset file (default
$CANTANTE_DATA/mbpp/mbpp.jsonl), for the hidden tests.

Prints: tool calls per agent (parsed calls, and replies holding a bare
`{"name": ..., "arguments": ...}` of a tool without the <tool_call> tag), how
often the validator's final prediction is its template's example text, and,
with every coder pass's <code> run against the hidden tests (a plain Python
subprocess, 10 s each; use on trusted model output only, or in a sandbox):
items the first pass solves, items some pass solves, items the final code
solves, and items a later pass lost.

Every program runs in cantante's code sandbox (`cantante sandbox`: rlimits,
own uid, no network, own pid and mount namespaces, 10 s), the way the MBPP
metric runs it: code, then the setup code and each hidden test. The binary is
$CANTANTE_BIN (default target/release/cantante).
"""
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

TOOLS = ("write_code", "run_code", "read_code", "check_tests")


def strip_fences(code):
    m = re.search(r"```(?:python)?\n(.*?)```", code, re.S)
    return m.group(1) if m else code


BIN = os.environ.get("CANTANTE_BIN", "target/release/cantante")


def passes(code, item):
    """Whether `code` passes all hidden tests of `item`, in the sandbox."""
    with tempfile.TemporaryDirectory() as d:
        files = {"code.py": strip_fences(code), "tests.txt": "\n".join(item["test_list"]) + "\n",
                 "setup.py": item.get("test_setup_code", "")}
        for name, text in files.items():
            with open(os.path.join(d, name), "w") as f:
                f.write(text)
        cmd = [BIN, "sandbox", "--code", os.path.join(d, "code.py"),
               "--tests", os.path.join(d, "tests.txt"), "--timeout", "10"]
        if files["setup.py"].strip():
            cmd += ["--setup", os.path.join(d, "setup.py")]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return False
    if r.returncode not in (0, 1) or not r.stdout.startswith("Passed"):
        sys.exit(f"mbpp-traces.py: `{' '.join(cmd[:2])}` failed (exit {r.returncode}): {r.stderr.strip()}")
    return r.returncode == 0


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    data = sys.argv[2] if len(sys.argv) > 2 else os.path.join(
        os.environ.get("CANTANTE_DATA", "datasets"), "mbpp", "mbpp.jsonl")
    items = {}
    with open(data) as f:
        for line in f:
            d = json.loads(line)
            items[d["task_id"]] = d
    with open(sys.argv[1]) as f:
        traces = [json.loads(line) for line in f]
    calls = collections.Counter()
    replies = collections.Counter()
    bare = collections.Counter()
    c = collections.Counter()
    for t in traces:
        for call in t["calls"]:
            a = call["agent"]
            replies[a] += 1
            calls[a] += len(call["tool_calls"])
            r = call["reply"]
            if '"name"' in r and any(x in r for x in TOOLS) and "<tool_call>" not in r:
                bare[a] += 1
        pred = t["prediction"].strip().lower()
        c["prediction is template text"] += pred in ("the code, unchanged", "the function, unchanged")
        tid = int(str(t["example_id"]).split("-")[-1])
        codes = [x["outputs"].get("code", "") for x in t["calls"] if x["agent"] == "coder_agent"]
        ok = [passes(code, items[tid]) for code in codes] or [False]
        c["items"] += 1
        c["solved (final score)"] += t["score"] == 1.0
        c["first coder pass solves"] += ok[0]
        c["some coder pass solves"] += any(ok)
        c["solved by a pass, lost by the final code"] += any(ok) and t["score"] != 1.0
        c["coder passes > 1"] += len(codes) > 1
    for a in sorted(replies):
        print(f"{a}: {replies[a]} replies, {calls[a]} parsed tool calls, "
              f"{bare[a]} replies with a bare tool JSON (no <tool_call> tag)")
    for k, v in c.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
