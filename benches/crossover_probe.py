#!/usr/bin/env python3
"""Crossover probe for issue 15 (benches/results/ev15v9-gsm8k-cpu-val.md).

Does the prompt rewriter merge two parent templates, or paste them together?
Writes a JSONL of crossover meta prompts for `cantante generate --prompts`
(every pair of one agent's pool prompts, in two wordings: `current`, the text
of `crossover_prompt` in src/optimize/meta.rs, and `merge`, a candidate
rewording), then classifies the replies with the same rules as
`prompt_problems`: no `<prompt>` block, meta wrapper tags, the query
placeholder written twice, or a missing output tag.

    python3 benches/crossover_probe.py write --setup configs/gsm8k.yaml --agent executor_1 \
        --out runs/xprobe/prompts.jsonl
    cantante generate --model qwen2.5-coder-1.5b-instruct.gguf --prompts runs/xprobe/prompts.jsonl \
        --temperature 0.1 --max-tokens 256 --max-batch 32 --json > runs/xprobe/replies.jsonl
    python3 benches/crossover_probe.py score --prompts runs/xprobe/prompts.jsonl \
        --replies runs/xprobe/replies.jsonl --setup configs/gsm8k.yaml --agent executor_1

Needs PyYAML (the DSPy venv has it).
"""
import argparse
import itertools
import json
import re

import yaml

META_TAGS = ["prompt", "template", "template_a", "template_b"]


def agent_spec(setup, name):
    d = yaml.safe_load(open(setup))
    spec = next(a for a in d["agents"] if a["name"] == name)
    return spec, d["init_agent_prompt_pool"][name]


def rules(spec):
    ins = ", ".join("{%s}" % v for v in spec["input_vars"] if v != "few_shots")
    outs = ", ".join("<%s>" % v for v in spec["output_vars"])
    first = spec["output_vars"][0]
    shots = ""
    if "few_shots" in spec["input_vars"]:
        shots = "- The placeholder {few_shots} (worked examples, possibly empty) may be kept or left out.\n"
    return (
        "Rules for the new template:\n"
        f"- It must contain each of these input placeholders, written exactly like this, with single curly braces: {ins}. "
        "You may move them, but do not rename, remove or add placeholders.\n"
        f"{shots}- It must tell the model to write each of these outputs inside its own pair of XML tags: {outs} "
        f"(for example <{first}>...</{first}>).\n"
        "- Keep any tool-call syntax and doubled braces {{ }} exactly as they are.\n"
        "Reply with the new template only, between <prompt> and </prompt>."
    )


def current(spec, a, b):
    return (
        "You improve instructions for one step of an AI pipeline.\n"
        f"The step's job: {spec['task_description'].strip()}\n\n"
        "Two instruction templates for this step have worked reasonably well:\n"
        f"<template_a>\n{a}\n</template_a>\n<template_b>\n{b}\n</template_b>\n\n"
        "Combine them into a single coherent template that takes the strongest guidance from each and reads as one text.\n"
        + rules(spec)
    )


def merge(spec, a, b):
    return (
        "You improve instructions for one step of an AI pipeline.\n"
        f"The step's job: {spec['task_description'].strip()}\n\n"
        "Two instruction templates for this step have worked reasonably well.\n\n"
        f"Template A:\n{a}\n\nTemplate B:\n{b}\n\n"
        "Write one new template that blends them: take a few of the best instructions from A and a few from B, "
        "and leave out the rest. Do not copy A and B one after the other: the new template must be about as short "
        "as the shorter of the two, and each placeholder may appear only once in it.\n"
        + rules(spec)
    )


WORDINGS = {"current": current, "merge": merge}


def problems(text, spec, sources):
    m = list(re.finditer(r"<prompt>", text))
    if not m:
        return ["no <prompt>"]
    body = text[m[-1].end():]
    body = body.split("</prompt>")[0].strip()
    if body.startswith("<template>") and body.endswith("</template>") and body.count("<template>") == 1:
        body = body[len("<template>"):-len("</template>")].strip()
    out = []
    for v in spec["input_vars"]:
        n = len(re.findall(r"(?<!\{)\{%s\}(?!\})" % v, body))
        allowed = max([1] + [len(re.findall(r"(?<!\{)\{%s\}(?!\})" % v, s)) for s in sources])
        if v != "few_shots" and n == 0:
            out.append("missing {%s}" % v)
        if n > allowed:
            out.append("{%s} x%d" % (v, n))
    for v in spec["output_vars"]:
        if "<%s>" % v not in body:
            out.append("missing <%s>" % v)
    for t in META_TAGS:
        if any(("<%s>" % t) in body or ("</%s>" % t) in body for _ in [0]) and not any(
            ("<%s>" % t) in s for s in sources
        ):
            out.append("<%s>" % t)
    return out, body


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["write", "score"])
    ap.add_argument("--setup", required=True)
    ap.add_argument("--agent", required=True)
    ap.add_argument("--out")
    ap.add_argument("--prompts")
    ap.add_argument("--replies")
    args = ap.parse_args()
    spec, pool = agent_spec(args.setup, args.agent)
    if args.cmd == "write":
        with open(args.out, "w") as f:
            for w, fn in WORDINGS.items():
                for i, j in itertools.permutations(range(len(pool)), 2):
                    f.write(json.dumps({"prompt": fn(spec, pool[i], pool[j]), "seed": 1000 + 10 * i + j,
                                        "wording": w, "parents": [i, j]}) + "\n")
        return
    prompts = [json.loads(l) for l in open(args.prompts)]
    replies = [json.loads(l) for l in open(args.replies)]
    stats = {}
    for p, r in zip(prompts, replies):
        text = r.get("text") or r.get("completion") or ""
        res = problems(text, spec, [pool[i] for i in p["parents"]])
        probs, body = (res, "") if isinstance(res, list) else res
        s = stats.setdefault(p["wording"], {"n": 0, "valid": 0, "lens": [], "copies": 0})
        s["n"] += 1
        if not probs:
            s["valid"] += 1
            s["lens"].append(len(body))
            if any(body.strip() == pool[i].strip() for i in p["parents"]):
                s["copies"] += 1
        print(p["wording"], p["parents"], probs or "ok", len(body))
    for w, s in stats.items():
        mean = sum(s["lens"]) / len(s["lens"]) if s["lens"] else 0
        print(f"{w}: {s['valid']}/{s['n']} valid, {s['copies']} of them a parent verbatim, mean length {mean:.0f} chars")


if __name__ == "__main__":
    main()
