#!/usr/bin/env python3
"""Worked-example probe for issue 15 (benches/results/ev15v8-gsm8k-cpu-val.md).

Writes a prompt set (YAML agent -> prompt, for `cantante eval --prompts`) in
which each GSM8K executor prompt carries N gold train solutions as worked
examples, in the executor's own output tags, either inside its few-shot
section (`--where section`: where the shipped prompts put them, after the
problem) or before everything else (`--where first`). The consensus prompt is
left as is. Gold solutions lose their `<<a*b=c>>` calculator annotations.
Items of the seed's dev and validation samples are never used.

    cantante data sample --task gsm8k --split dev --n 30 --seed 7 > dev.jsonl
    cantante data sample --task gsm8k --split validation --n 40 --seed 7 > val.jsonl
    python3 benches/shots_probe.py --prompts runs/X/gsm8k/seed7/cantante/best_prompts.yaml \
        --train $CANTANTE_DATA/gsm8k/train.jsonl --exclude dev.jsonl val.jsonl \
        --where first --out prompts-gold3-first.yaml
    cantante eval --setup configs/gsm8k.yaml --task gsm8k --split test --limit 50 --seed 7 \
        --prompts prompts-gold3-first.yaml --temperature 0 --max-tokens 512 --field-cap 256 \
        --format-repairs 0 --tag-guard true --model ... --out runs/probe

Needs PyYAML (the DSPy venv has it).
"""
import argparse
import json
import re

import yaml


def gold_shots(train_path, exclude, n):
    """The first n train items (file order) with 2-4 solution lines and a short question."""
    picked = []
    with open(train_path) as f:
        for i, line in enumerate(f):
            if f"gsm8k-train-{i}" in exclude:
                continue
            t = json.loads(line)
            steps = t["answer"].split("####")[0].strip().split("\n")
            if 2 <= len(steps) <= 4 and len(t["question"]) < 300:
                picked.append(t)
            if len(picked) == n:
                break
    return picked


def shot(t, k):
    sol, ans = t["answer"].split("####")
    sol = re.sub(r"<<[^>]*>>", "", sol).strip().replace("\n", " ")
    ans = ans.strip().replace(",", "")
    return (f"Problem: {t['question']}\n<justification_{k}>{sol}</justification_{k}>\n"
            f"<proposal_{k}>{ans}</proposal_{k}>")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", required=True, help="prompt set YAML (agent -> prompt)")
    ap.add_argument("--train", required=True, help="GSM8K train.jsonl")
    ap.add_argument("--exclude", nargs="*", default=[], help="JSONL samples whose ids are not used")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--where", choices=["section", "first"], default="first")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    exclude = set()
    for path in a.exclude:
        with open(path) as f:
            exclude.update(json.loads(l)["id"] for l in f if l.strip())
    shots = gold_shots(a.train, exclude, a.n)
    prompts = yaml.safe_load(open(a.prompts))
    section = re.compile(r"\n?<few_shots_section>\n?(.*?)\n?</few_shots_section>\n?", re.S)
    for agent, p in prompts.items():
        m = re.fullmatch(r"executor_(\d+)", agent)
        if not m:
            continue
        text = "\n\n".join(shot(t, m.group(1)) for t in shots).replace("{", "{{").replace("}", "}}")
        if a.where == "section":
            # The section's own label stays; its wrapper tags and placeholder go.
            p = section.sub(lambda s: "\n" + s.group(1).replace("{few_shots}", text) + "\n", p).rstrip()
        else:
            p = "Solved examples:\n\n" + text + "\n\nNow the problem to solve.\n\n" + section.sub("\n", p).strip()
        assert "{few_shots}" not in p, agent
        prompts[agent] = p
    with open(a.out, "w") as f:
        yaml.safe_dump(prompts, f, sort_keys=True, allow_unicode=True, width=10000)


if __name__ == "__main__":
    main()
