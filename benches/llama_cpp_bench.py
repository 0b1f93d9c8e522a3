"""llama.cpp side of `cargo bench --bench engine` (run through benches/llama_cpp.sh).

Usage: llama_cpp_bench.py MODEL.gguf WORKLOAD.json THREADS

WORKLOAD.json (written by the Rust bench): {"prompts": [[token ids]...],
"batches": [1, 8, ...], "new_tokens": 64, "prefill": [token ids]}. The exact
token ids our engine processes are fed to llama.cpp, so both do the same work:
for each batch size b, prompts[:b] are prefilled together and decoded greedily
for new_tokens tokens each (no early stop), timed from the first prefill to the
last token, like the Rust side; then one long prompt is prefilled alone.
Prints one JSON line per measurement.
"""
import ctypes
import json
import sys
import time

import llama_cpp as L
import numpy as np


def clear(ctx):
    if hasattr(L, "llama_memory_clear"):
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
    else:
        L.llama_kv_self_clear(ctx)


def fill(batch, items):
    """items: (token, pos, seq, want_logits)."""
    for i, (tok, pos, seq, logits) in enumerate(items):
        batch.token[i] = tok
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = 1 if logits else 0
    batch.n_tokens = len(items)


def main():
    model_path, workload, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    w = json.load(open(workload))
    prompts, batches, new = w["prompts"], w["batches"], w["new_tokens"]
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(model_path.encode(), mp)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    max_b = max(batches)
    need = sum(len(p) + new for p in prompts[:max_b])
    cp = L.llama_context_default_params()
    cp.n_ctx = max(need, len(w["prefill"]) + 8) + 256
    cp.n_batch = max(cp.n_ctx, 2048)
    cp.n_ubatch = 512
    cp.n_seq_max = max_b
    cp.n_threads = threads
    cp.n_threads_batch = threads
    if hasattr(cp, "kv_unified"):
        cp.kv_unified = True
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(cp.n_batch, 0, max_b)

    def logits_row(i):
        return np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))

    def run(b):
        clear(ctx)
        items = []
        last_idx = []
        for s, p in enumerate(prompts[:b]):
            for j, t in enumerate(p):
                items.append((t, j, s, j == len(p) - 1))
            last_idx.append(len(items) - 1)
        t0 = time.perf_counter()
        fill(batch, items)
        assert L.llama_decode(ctx, batch) == 0
        nxt = [int(np.argmax(logits_row(i))) for i in last_idx]
        pos = [len(p) for p in prompts[:b]]
        generated = b
        for _ in range(new - 1):
            fill(batch, [(nxt[s], pos[s], s, True) for s in range(b)])
            assert L.llama_decode(ctx, batch) == 0
            nxt = [int(np.argmax(logits_row(s))) for s in range(b)]
            pos = [x + 1 for x in pos]
            generated += b
        return generated / (time.perf_counter() - t0)

    run(1)  # warm-up
    for b in batches:
        print(json.dumps({"kind": "decode", "batch": b, "tok_s": run(b)}), flush=True)
    pre = w["prefill"]
    clear(ctx)
    t0 = time.perf_counter()
    fill(batch, [(t, j, 0, j == len(pre) - 1) for j, t in enumerate(pre)])
    assert L.llama_decode(ctx, batch) == 0
    print(json.dumps({"kind": "prefill", "tokens": len(pre), "tok_s": len(pre) / (time.perf_counter() - t0)}), flush=True)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)


if __name__ == "__main__":
    main()
