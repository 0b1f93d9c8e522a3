#!/usr/bin/env python3
"""DSPy baselines (MIPROv2, GEPA) on the same local model, items and setup
shape as a cantante bench-run, through `cantante serve`.

The GSM8K setup of configs/gsm8k.yaml as a DSPy program: three independent
chain-of-thought solvers and a consensus module that picks among their
proposals. MBPP: planner -> coder, scored by running the task's hidden tests in
a subprocess (timeout, no network is needed).

    benches/dspy/install.sh
    cantante serve --model M --port 8090 &
    cantante data sample --task gsm8k --split test --n 50 --seed 7 > test.jsonl
    cantante data sample --task gsm8k --split dev --n 30 --seed 7 > dev.jsonl
    ~/.cache/cantante/dspy-venv/bin/python benches/dspy/baseline.py \
        --task gsm8k --api-base http://127.0.0.1:8090/v1 --dev dev.jsonl \
        --test test.jsonl --optimizer mipro --seed 7 --out runs/dspy/gsm8k-mipro-7.json

`--optimizer none` evaluates the unoptimized program (DSPy's own default
prompts). `--meta-api-base URL` gives the optimizer a second served model for
its own calls, as CANTANTE's `--meta-model` does: MIPROv2's instruction
proposals (`prompt_model`) and GEPA's reflections (`reflection_lm`); without
it the task model writes them too. The JSON result holds the accuracy, per-item scores (same ids as
cantante's traces, so the paired comparison applies), the tokens every call
spent (from the server's `usage`), wall time and the settings.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time


def load_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm8k_correct(prediction, target):
    """cantante's rule: the last number in the prediction equals the gold number."""
    nums = NUMBER.findall(str(prediction or ""))
    if not nums:
        return 0.0
    try:
        return float(abs(float(nums[-1].replace(",", "")) - float(target.replace(",", ""))) < 1e-6)
    except ValueError:
        return 0.0


def mbpp_correct(code, example, timeout=10):
    code = str(code or "")
    m = re.search(r"```(?:python)?\n(.*?)```", code, re.S)
    if m:
        code = m.group(1)
    program = "\n".join([example.get("setup_code", ""), code] + example["tests"])
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(program)
        path = f.name
    try:
        r = subprocess.run([sys.executable, path], capture_output=True, timeout=timeout)
        return float(r.returncode == 0)
    except subprocess.TimeoutExpired:
        return 0.0
    finally:
        os.unlink(path)


def build(dspy, task):
    if task == "gsm8k":

        class Solve(dspy.Signature):
            """Solve the grade-school math word problem. Give the final answer as a bare number."""

            question: str = dspy.InputField()
            answer: str = dspy.OutputField(desc="the final number only")

        class Choose(dspy.Signature):
            """Three solvers answered the problem. Pick the best-supported proposal (majority first, then the one whose reasoning is sound). Give the chosen number alone."""

            question: str = dspy.InputField()
            proposals: str = dspy.InputField(desc="the three proposals with their reasoning")
            answer: str = dspy.OutputField(desc="the chosen number only")

        class Mas(dspy.Module):
            def __init__(self):
                super().__init__()
                self.executor_1 = dspy.ChainOfThought(Solve)
                self.executor_2 = dspy.ChainOfThought(Solve)
                self.executor_3 = dspy.ChainOfThought(Solve)
                self.consensus = dspy.Predict(Choose)

            def forward(self, question):
                outs = [s(question=question) for s in (self.executor_1, self.executor_2, self.executor_3)]
                text = "\n\n".join(
                    f"proposal_{i + 1}: {o.answer}\njustification_{i + 1}: {getattr(o, 'reasoning', '')}"
                    for i, o in enumerate(outs)
                )
                return self.consensus(question=question, proposals=text)

        def metric(example, pred, trace=None, *rest):
            return gsm8k_correct(pred.answer, example.target)

        return Mas(), metric, lambda e: dspy.Example(question=e["query"], target=e["target"]).with_inputs("question")

    class Plan(dspy.Signature):
        """Plan a Python function for the task: the steps, edge cases and the exact function name and signature the tests use."""

        task: str = dspy.InputField()
        plan: str = dspy.OutputField()

    class Code(dspy.Signature):
        """Write the Python function that solves the task, following the plan. Only code, no tests."""

        task: str = dspy.InputField()
        plan: str = dspy.InputField()
        code: str = dspy.OutputField(desc="the complete Python code")

    class Mas(dspy.Module):
        def __init__(self):
            super().__init__()
            self.planner = dspy.Predict(Plan)
            self.coder = dspy.Predict(Code)

        def forward(self, task):
            plan = self.planner(task=task).plan
            return self.coder(task=task, plan=plan)

    examples = {}

    def metric(example, pred, trace=None, *rest):
        return mbpp_correct(pred.code, examples[example.id])

    def to_example(e):
        examples[e["id"]] = e
        return dspy.Example(task=e["query"], id=e["id"]).with_inputs("task")

    return Mas(), metric, to_example


def usage_of(entries):
    inp = out = 0
    for h in entries:
        u = h.get("usage") or {}
        inp += u.get("prompt_tokens", 0) or 0
        out += u.get("completion_tokens", 0) or 0
    return inp, out


def write_history(calls, opt_calls, meta_model, path):
    """One JSON line per model call, in call order: what DSPy sent and what came back,
    with its phase (`optimization` or `test`) and whether the meta model made it."""
    with open(path, "w") as f:
        for i, h in enumerate(calls):
            outputs = h.get("outputs") or []
            f.write(json.dumps({
                "phase": "optimization" if i < opt_calls else "test",
                "meta": meta_model is not None and h.get("model") == meta_model,
                "messages": h.get("messages"),
                "reply": outputs[0] if outputs else None,
                "usage": dict(h.get("usage") or {}),
            }, default=str) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["gsm8k", "mbpp"], required=True)
    ap.add_argument("--api-base", required=True, help="cantante serve's URL ending in /v1")
    ap.add_argument("--model-name", default=None, help="served model (default: the first of /v1/models)")
    ap.add_argument("--dev", required=True, help="JSONL from `cantante data sample --split dev`")
    ap.add_argument("--test", required=True, help="JSONL from `cantante data sample --split test`")
    ap.add_argument("--optimizer", choices=["none", "mipro", "gepa"], default="mipro")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=16, help="concurrent requests (they share the engine's batches)")
    ap.add_argument("--mipro-trials", type=int, default=6, help="MIPROv2 num_trials (sets the budget)")
    ap.add_argument("--mipro-candidates", type=int, default=3)
    ap.add_argument("--gepa-metric-calls", type=int, default=60, help="GEPA max_metric_calls (sets the budget)")
    ap.add_argument("--meta-api-base", default=None,
                    help="URL (ending in /v1) of a server for the optimizer's own calls (MIPROv2 proposals, GEPA reflections)")
    ap.add_argument("--meta-label", default=None,
                    help="name of the meta model for the result (e.g. the GGUF file stem; default: the served name)")
    ap.add_argument("--meta-max-tokens", type=int, default=1024)
    ap.add_argument("--meta-temperature", type=float, default=0.7)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--history", default=None,
                    help="write every model call (phase, messages, reply, usage) to this JSONL file")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import dspy
    import urllib.request
    from dspy.clients import base_lm

    # Token counts come from DSPy's global call record, which sees every call,
    # including those of the LM copies MIPROv2's proposer makes (a copy's own
    # `history` starts empty, so the LM's history misses them). Keep all of it.
    base_lm.MAX_HISTORY_SIZE = 10**12

    def served(api_base):
        with urllib.request.urlopen(api_base.rstrip("/") + "/models") as r:
            return json.load(r)["data"][0]["id"]

    def served_lm(name, api_base, max_tokens, temperature):
        return dspy.LM("openai/" + name, api_base=api_base,
                       api_key=os.environ.get("CANTANTE_API_KEY", "none"),
                       max_tokens=max_tokens, temperature=temperature, cache=False, num_retries=4)

    name = a.model_name or served(a.api_base)
    lm = served_lm(name, a.api_base, a.max_tokens, a.temperature)
    # The optimizer's own model (proposals, reflections): a second server, or the task model.
    meta_lm, meta_name = lm, None
    if a.meta_api_base:
        served_meta = served(a.meta_api_base)
        if served_meta == name:
            sys.exit(f"both servers serve the model name `{name}`: start the meta one with "
                     "`cantante serve --served-model-name` set to another name, so their calls can be told apart")
        meta_name = a.meta_label or served_meta
        meta_lm = served_lm(served_meta, a.meta_api_base, a.meta_max_tokens, a.meta_temperature)
    # A reply the adapter cannot parse is a failed rollout (score 0), as a
    # malformed reply is in cantante; DSPy's default stops after 10 of them.
    dspy.configure(lm=lm, max_errors=10**9)
    program, metric, to_example = build(dspy, a.task)
    failures = {"count": 0}
    forward = type(program).forward

    def counted_forward(self, *args, **kwargs):
        try:
            return forward(self, *args, **kwargs)
        except Exception:
            failures["count"] += 1
            raise

    type(program).forward = counted_forward
    dev = [to_example(e) for e in load_jsonl(a.dev)]
    test_items = load_jsonl(a.test)[: a.limit_test]
    test = [to_example(e) for e in test_items]

    started = time.time()
    if a.optimizer == "mipro":
        opt = dspy.MIPROv2(metric=metric, auto=None, num_candidates=a.mipro_candidates,
                           prompt_model=meta_lm, task_model=lm,
                           num_threads=a.threads, seed=a.seed, verbose=False)
        half = max(1, len(dev) // 2)
        program = opt.compile(program, trainset=dev[:half], valset=dev[half:], num_trials=a.mipro_trials,
                              max_bootstrapped_demos=2, max_labeled_demos=2,
                              minibatch_size=min(10, max(1, len(dev) - half)))
    elif a.optimizer == "gepa":
        def feedback_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
            score = metric(gold, pred)
            return dspy.Prediction(score=score, feedback="correct" if score else "wrong answer")

        opt = dspy.GEPA(metric=feedback_metric, max_metric_calls=a.gepa_metric_calls,
                        num_threads=a.threads, reflection_lm=meta_lm, seed=a.seed)
        half = max(1, len(dev) // 2)
        program = opt.compile(program, trainset=dev[:half], valset=dev[half:])
    opt_secs = time.time() - started
    calls = base_lm.GLOBAL_HISTORY
    meta_id = meta_lm.model if meta_lm is not lm else None
    opt_calls = len(calls)
    opt_in, opt_out = usage_of(h for h in calls if h.get("model") != meta_id)
    meta_in, meta_out = usage_of(h for h in calls if h.get("model") == meta_id)
    opt_failures = failures["count"]

    started = time.time()
    ev = dspy.Evaluate(devset=test, metric=metric, num_threads=a.threads, display_progress=False)
    res = ev(program)
    # Per-item scores, in test order (dspy.Evaluate returns (example, prediction, score) triples).
    rows = getattr(res, "results", None) or []
    scores = {}
    for e, (_, _, s) in zip(test_items, rows):
        scores[e["id"]] = float(s or 0.0)
    test_secs = time.time() - started
    all_in, all_out = usage_of(h for h in calls if h.get("model") != meta_id)
    out = {
        "task": a.task,
        "optimizer": a.optimizer,
        "dspy_version": dspy.__version__,
        "seed": a.seed,
        "model": name,
        "api_base": a.api_base,
        "dev_items": len(dev),
        "test_items": len(test),
        "accuracy": sum(scores.values()) / max(1, len(scores)),
        "item_scores": scores,
        "meta_model": meta_name,
        # Every optimization call, the meta model's included (CANTANTE's budget counts both too).
        "opt_tokens": {"input": opt_in + meta_in, "output": opt_out + meta_out},
        "meta_tokens": {"input": meta_in, "output": meta_out},
        "test_tokens": {"input": all_in - opt_in, "output": all_out - opt_out},
        "failed_rollouts": {"optimization": opt_failures, "test": failures["count"] - opt_failures},
        "opt_wall_secs": opt_secs,
        "test_wall_secs": test_secs,
        "settings": {k: v for k, v in vars(a).items() if k not in ("out",)},
        "prompts": {n: str(p.signature.instructions) for n, p in program.named_predictors()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    if a.history:
        write_history(calls, opt_calls, meta_id, a.history)
    print(f"{a.task} {a.optimizer}: accuracy {out['accuracy']:.3f} on {len(scores)} items; "
          f"optimization {opt_in + opt_out + meta_in + meta_out} tokens "
          f"({meta_in + meta_out} of them the meta model's), {opt_secs:.0f} s; wrote {a.out}")


if __name__ == "__main__":
    main()
