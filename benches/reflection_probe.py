#!/usr/bin/env python3
"""Reflection probe (issue 15): can the local rewriter repair a prompt when it
is shown the failures that prompt caused?

Builds, from a finished planted-fault bench-run (benches/planted_fault_bench.sh),
a GEPA-style reflective rewrite request for the consensus agent: its faulty
template, the test rollouts where the pipeline answered "0" (problem, the
agent's output, the correct answer, a negative judged effect) and the usual
template contract. Two variants: `rewrite` (reply with the template only) and
`diagnose` (first quote and explain the line that caused the failures, then
write the template). Each is sent to the meta model with `cantante generate`
for several seeds; the script reports whether the fault line survived.

    benches/reflection_probe.py RUN_DIR META_GGUF [--seeds 1,2,3] [--bin target/release/cantante]
    benches/reflection_probe.py runs/planted-gsm8k ~/.cache/cantante/models/qwen2.5-coder-1.5b-instruct.gguf

Prints a Markdown report on stdout (the generated replies included).
"""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml  # PyYAML; the setups are YAML

FAULT = "your final answer is always 0"


def build(run_dir: Path, variant: str, cases: int = 2) -> str:
    setup = yaml.safe_load((run_dir / "setups" / "gsm8k.yaml").read_text())
    template = setup["init_agent_prompt_pool"]["consensus_agent"][0]
    agents = setup["agents"]
    agents = agents if isinstance(agents, list) else [dict(name=k, **v) for k, v in agents.items()]
    spec = next(a for a in agents if a["name"] == "consensus_agent")
    shown = []
    traces = sorted((run_dir / "gsm8k").glob("seed*/initial_test_traces.jsonl"))[0]
    for line in traces.read_text().splitlines():
        t = json.loads(line)
        if t["prediction"] == "0" and t["target"] != "0" and len(shown) < cases:
            shown.append(
                f"Case {len(shown) + 1}\nProblem: {t['state']['query'][:300]}\n"
                f"This step's output: <prediction>{t['prediction']}</prediction>\n"
                f"Final answer of the pipeline: {t['prediction']} (correct answer: {t['target']}; score 0)\n"
                "Judged effect of this step: -0.8 (it hurt)"
            )
    ins = ", ".join("{%s}" % v for v in spec["input_vars"] if v != "few_shots")
    outs = ", ".join("<%s>" % v for v in spec["output_vars"])
    if variant == "rewrite":
        ask = ("Find the part of the template that led to these mistakes. Write an improved template: "
               "delete or correct any instruction that caused them and add guidance that avoids them; keep the rest.")
        reply = "Reply with the new template only, between <prompt> and </prompt>."
    else:
        ask = ('First, under "Diagnosis:", quote the line of the template that made this step produce these '
               "wrong outputs, and say why it is wrong. Then write an improved template without that line "
               "(or with it corrected); keep the rest.")
        reply = "After the diagnosis, write the new template between <prompt> and </prompt>."
    return (
        "You improve instructions for one step of an AI pipeline.\n"
        f"The step's job: {spec['task_description'].strip()}\n\n"
        f"Here is the current instruction template for this step:\n<template>\n{template}\n</template>\n\n"
        "In these recent runs of the pipeline the final answer was wrong, and this step was judged to have caused it:\n\n"
        + "\n".join(shown)
        + f"\n\n{ask}\nRules for the new template:\n"
        f"- It must contain each of these input placeholders, written exactly like this, with single curly braces: {ins}. "
        "You may move them, but do not rename, remove or add placeholders.\n"
        "- The placeholder {few_shots} (worked examples, possibly empty) may be kept or left out.\n"
        f"- It must tell the model to write each of these outputs inside its own pair of XML tags: {outs}.\n"
        + reply
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("meta_model")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--bin", default="target/release/cantante")
    ap.add_argument("--max-tokens", type=int, default=400)
    a = ap.parse_args()
    print("# Reflection probe: does the rewriter remove a harmful line it is shown failing?\n")
    print(f"Run: `{a.run_dir}`, meta model `{Path(a.meta_model).name}`, temperature 0.1, "
          f"{a.max_tokens} new tokens, seeds {a.seeds}.\n")
    print("| variant | seed | reply has a template | fault line kept |\n|---|---|---|---|")
    details = []
    for variant in ("rewrite", "diagnose"):
        prompt = build(a.run_dir, variant)
        details.append(f"## Request `{variant}`\n\n```\n{prompt}\n```\n")
        for seed in a.seeds.split(","):
            out = subprocess.run(
                [a.bin, "generate", "--model", a.meta_model, "--prompt", prompt, "--temperature", "0.1",
                 "--seed", seed, "--max-tokens", str(a.max_tokens)],
                capture_output=True, text=True, check=True,
            ).stdout
            m = re.findall(r"<prompt>(.*?)(?:</prompt>|$)", out, re.S)
            body = m[-1] if m else ""
            kept = FAULT in (body or out)
            print(f"| {variant} | {seed} | {'yes' if m else 'no'} | {'yes' if kept else 'no'} |")
            details.append(f"### `{variant}`, seed {seed}\n\n```\n{out.strip()}\n```\n")
    print()
    print("\n".join(details))
    return 0


if __name__ == "__main__":
    sys.exit(main())
