//! Engine benchmark (run: `cargo bench --bench engine`). Prints, for the tiny
//! seeded model and for the default model when it is cached (models/fetch.sh):
//! decode tokens/s at batch 1, 8, 32, 64; prefill tokens/s; batched/sequential
//! ratios; the fraction of prefill tokens saved by prefix reuse on 32 requests
//! sharing a long instruction; the machine's measured f32 matmul peak and decode
//! FLOP/s as a fraction of it. Set CANTANTE_BENCH_MODEL to bench another model,
//! CANTANTE_BENCH_BATCHES=1,8,32 to choose batch sizes.

use candle_core::{Device, Tensor};
use cantante::llm::engine::{CandleLlm, EngineOptions};
use cantante::llm::model::WeightFormat;
use cantante::llm::tiny::{write_tiny_gguf, TinySpec};
use cantante::llm::{Llm, Request};
use std::time::Instant;

fn matmul_peak() -> f64 {
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu).unwrap();
    let _ = a.matmul(&b).unwrap();
    let reps = 8;
    let t = Instant::now();
    for _ in 0..reps {
        let _ = a.matmul(&b).unwrap();
    }
    2.0 * (n * n * n) as f64 * reps as f64 / t.elapsed().as_secs_f64()
}

fn decode_rate(llm: &CandleLlm, batch: usize, new_tokens: usize) -> (f64, f64) {
    let reqs: Vec<Request> = (0..batch)
        .map(|i| {
            Request::user(
                format!("Count upward from {i} and describe each number in words:"),
                new_tokens,
            )
        })
        .collect();
    llm.clear_prefix_cache();
    let t = Instant::now();
    let gens = llm.generate(&reqs).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let generated: usize = gens.iter().map(|g| g.completion_tokens).sum();
    let prompt: usize = gens.iter().map(|g| g.prompt_tokens).sum();
    (generated as f64 / secs, prompt as f64)
}

fn prefill_rate(llm: &CandleLlm) -> f64 {
    let text =
        "The committee reviewed the proposal in detail and asked several questions. ".repeat(30);
    let r = Request::user(text, 1);
    llm.clear_prefix_cache();
    let t = Instant::now();
    let g = llm.generate(&[r]).unwrap().remove(0);
    g.prompt_tokens as f64 / t.elapsed().as_secs_f64()
}

fn prefix_saving(llm: &CandleLlm) -> f64 {
    let instruction = "You are the consensus agent of a math-solving team. Three solvers proposed answers with justifications. \
        Compare the proposals, check the arithmetic of each justification, and choose the best-supported answer. \
        Do not re-solve the problem from scratch. Reply with the chosen number inside <prediction></prediction> tags. "
        .repeat(2);
    let reqs: Vec<Request> = (0..32)
        .map(|i| {
            Request::chat(
                "You are a helpful assistant.",
                &format!(
                    "{instruction}\nQuestion {i}: Tom has {i} apples and buys {} more. How many?",
                    i + 3
                ),
                1,
            )
        })
        .collect();
    llm.clear_prefix_cache();
    llm.reset_stats();
    llm.generate(&reqs).unwrap();
    let s = llm.stats();
    1.0 - s.prefill_computed as f64 / s.prompt_tokens as f64
}

fn bench(name: &str, llm: &mut CandleLlm, batches: &[usize], new_tokens: usize, peak: f64) {
    println!("\n== {name}: {}", llm.model_id());
    let flops_per_tok = 2.0 * llm.model().config().matmul_params() as f64;
    let mut base = 0.0;
    for &b in batches {
        llm.set_max_batch(b);
        let (rate, _) = decode_rate(llm, b, new_tokens);
        if b == batches[0] {
            base = rate;
        }
        println!(
            "decode batch {b:>3}: {rate:>8.1} tok/s  ({:.2}x batch {}; {:.1} GFLOP/s = {:.1}% of f32 peak)",
            rate / base,
            batches[0],
            rate * flops_per_tok / 1e9,
            100.0 * rate * flops_per_tok / peak
        );
    }
    llm.set_max_batch(32);
    println!("prefill: {:.1} tok/s", prefill_rate(llm));
    println!(
        "prefix reuse on 32 requests sharing an instruction: {:.1}% of prefill tokens saved",
        100.0 * prefix_saving(llm)
    );
}

fn main() {
    let batches: Vec<usize> = std::env::var("CANTANTE_BENCH_BATCHES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 32, 64]);
    let peak = matmul_peak();
    println!(
        "f32 matmul peak (candle, n=1024): {:.1} GFLOP/s",
        peak / 1e9
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    write_tiny_gguf(&p, TinySpec::default()).unwrap();
    let mut tiny = CandleLlm::load(p.to_str().unwrap(), EngineOptions::default()).unwrap();
    bench("tiny (2 layers, hidden 64)", &mut tiny, &batches, 64, peak);
    let model = std::env::var("CANTANTE_BENCH_MODEL").unwrap_or_else(|_| {
        format!(
            "{}/.cache/cantante/models/qwen2.5-coder-0.5b-instruct.gguf",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    if std::path::Path::new(&model).exists() {
        let mut llm = CandleLlm::load(&model, EngineOptions::default()).unwrap();
        bench("default model, f32 weights", &mut llm, &batches, 32, peak);
        drop(llm);
        let opts = EngineOptions {
            weights: Some(WeightFormat::Q8),
            ..Default::default()
        };
        let mut q8 = CandleLlm::load(&model, opts).unwrap();
        let small: Vec<usize> = batches.iter().copied().filter(|&b| b <= 8).collect();
        bench(
            "default model, Q8_0 weights (--weights q8)",
            &mut q8,
            &small,
            32,
            peak,
        );
    } else {
        println!("\n(default model not found at {model}; run models/fetch.sh to bench it)");
    }
}
