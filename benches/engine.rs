//! Engine benchmark (run: `cargo bench --bench engine`). Prints, in one run on
//! one machine:
//!
//! - the machine: CPU, kernel tier, threads, measured streaming-read bandwidth
//!   and int8 multiply-add peak (AVX2 `maddubs` in registers, all threads;
//!   also 512-bit `vpdpbusd` where the CPU has AVX-512 VNNI);
//! - the tiny seeded model: decode tok/s and the fixed cost per layer per step;
//! - for the default 0.5B model and the 1.5B model (when `models/fetch.sh` has
//!   cached them; `CANTANTE_BENCH_MODELS=a.gguf,b.gguf` picks others): decode
//!   tok/s at batch 1, 8, 32, 64 (`CANTANTE_BENCH_BATCHES`) with 64 new tokens
//!   per sequence (`CANTANTE_BENCH_NEW`), prefill tok/s of a ~900-token prompt,
//!   **ours and llama.cpp's side by side with the ratio** (llama.cpp through
//!   `benches/llama_cpp.sh`, fed the exact same token ids; "absent" when it is
//!   not installed), how close we are to the machine's limits, a profile of
//!   where a step's time goes at batch 1 and 32 and in prefill, and (first model
//!   only) the candle f32 executor (`--weights f32`) at batch 1 and 32 for
//!   comparison (`CANTANTE_BENCH_F32=0` skips it).
//!
//! Each model is measured in `CANTANTE_BENCH_ROUNDS` (default 2) rounds that
//! alternate ours and llama.cpp; each side's best round is reported, with the
//! range over rounds (a shared VM swings by a quarter between minutes).
//!
//! Both engines decode greedily, time from the first prefill to the last token,
//! and count generated tokens / seconds; model load is excluded.

use cantante::llm::engine::{CandleLlm, EngineOptions};
use cantante::llm::kernels::Tier;
use cantante::llm::model::WeightFormat;
use cantante::llm::profile;
use cantante::llm::tiny::{write_tiny_gguf, TinySpec};
use cantante::llm::{Llm, Request};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Instant;

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

/// Streaming-read bandwidth over a buffer far larger than the caches, all threads.
fn bandwidth() -> f64 {
    use rayon::prelude::*;
    let n = 64 << 20; // 64 Mi f32 = 256 MiB
    let buf: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let s: f32 = buf
            .par_chunks(1 << 20)
            .map(|c| {
                let mut acc = [0f32; 8];
                for x in c.chunks_exact(8) {
                    for i in 0..8 {
                        acc[i] += x[i];
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(s);
        best = best.max((n * 4) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

/// Multiply-adds per second of `run(iters)` on every thread at once, where one
/// iteration does `macs_per_iter` of them.
fn macs_per_second(run: impl Fn(usize) -> i32 + Sync, macs_per_iter: usize) -> f64 {
    use rayon::prelude::*;
    let threads = rayon::current_num_threads();
    let iters = 20_000_000;
    let t = Instant::now();
    let s: i32 = (0..threads).into_par_iter().map(|_| run(iters)).sum();
    std::hint::black_box(s);
    (threads * iters * macs_per_iter) as f64 / t.elapsed().as_secs_f64()
}

/// Int8 multiply-adds per second the kernels' instruction mix can reach
/// (maddubs + madd + add in registers, 8 independent chains, every thread).
fn int8_peak() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        if !(is_x86_feature_detected!("avx2")) {
            return None;
        }
        #[target_feature(enable = "avx2")]
        unsafe fn run(iters: usize) -> i32 {
            use std::arch::x86_64::*;
            // Inputs change every iteration so nothing is hoisted out of the loop.
            let inc = _mm256_set1_epi8(std::hint::black_box(1));
            let b = _mm256_set1_epi8(std::hint::black_box(-2));
            let ones = _mm256_set1_epi16(1);
            let mut a = [_mm256_setzero_si256(); 8];
            for (k, x) in a.iter_mut().enumerate() {
                *x = _mm256_set1_epi8(std::hint::black_box(k as i8));
            }
            let mut acc = [_mm256_setzero_si256(); 8];
            for _ in 0..iters {
                for (x, a) in acc.iter_mut().zip(a.iter_mut()) {
                    *x = _mm256_add_epi32(*x, _mm256_madd_epi16(_mm256_maddubs_epi16(*a, b), ones));
                    *a = _mm256_add_epi8(*a, inc);
                }
            }
            let mut s = 0;
            for x in acc {
                s += _mm256_extract_epi32::<0>(x);
            }
            s
        }
        // SAFETY: AVX2 was detected above.
        Some(macs_per_second(|i| unsafe { run(i) }, 8 * 32))
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Int8 multiply-adds per second of 512-bit `vpdpbusd` (64 per instruction,
/// 8 independent chains, every thread) where the CPU has AVX-512 VNNI: the
/// ceiling a 512-bit kernel could approach (llama.cpp's AVX-512 paths use
/// it; our `avx512vnni` tier uses 256-bit registers).
fn vnni512_peak() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni")) {
            return None;
        }
        #[target_feature(enable = "avx512f,avx512vnni")]
        unsafe fn run(iters: usize) -> i32 {
            use std::arch::x86_64::*;
            let inc = _mm512_set1_epi32(std::hint::black_box(0x0101_0101));
            let b = _mm512_set1_epi8(std::hint::black_box(-2));
            let mut a = [_mm512_setzero_si512(); 8];
            for (k, x) in a.iter_mut().enumerate() {
                *x = _mm512_set1_epi8(std::hint::black_box(k as i8));
            }
            let mut acc = [_mm512_setzero_si512(); 8];
            for _ in 0..iters {
                for (x, a) in acc.iter_mut().zip(a.iter_mut()) {
                    *x = _mm512_dpbusd_epi32(*x, *a, b);
                    *a = _mm512_add_epi32(*a, inc);
                }
            }
            acc.iter().map(|x| _mm512_reduce_add_epi32(*x)).sum()
        }
        // SAFETY: AVX-512 F and VNNI were detected above.
        Some(macs_per_second(|i| unsafe { run(i) }, 8 * 64))
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

fn decode_requests(batch: usize, new_tokens: usize) -> Vec<Request> {
    (0..batch)
        .map(|i| {
            Request::user(
                format!("Count upward from {i} and describe each number in words:"),
                new_tokens,
            )
        })
        .collect()
}

fn prefill_request() -> Request {
    let text =
        "The committee reviewed the proposal in detail and asked several questions. ".repeat(60);
    Request::user(text, 1)
}

fn decode_rate(llm: &CandleLlm, batch: usize, new_tokens: usize) -> f64 {
    let reqs = decode_requests(batch, new_tokens);
    llm.clear_prefix_cache();
    let t = Instant::now();
    let gens = llm.generate(&reqs).unwrap();
    let generated: usize = gens.iter().map(|g| g.completion_tokens).sum();
    generated as f64 / t.elapsed().as_secs_f64()
}

fn prefill_rate(llm: &CandleLlm) -> (usize, f64) {
    llm.clear_prefix_cache();
    let t = Instant::now();
    let g = llm.generate(&[prefill_request()]).unwrap().remove(0);
    (
        g.prompt_tokens,
        g.prompt_tokens as f64 / t.elapsed().as_secs_f64(),
    )
}

fn token_ids(llm: &CandleLlm, r: &Request) -> Vec<u32> {
    llm.tokenizer().encode(&llm.render(r).unwrap()).unwrap()
}

/// llama.cpp's rates on the same token ids: (decode rate per batch, prefill rate).
fn llama_cpp(
    llm: &CandleLlm,
    model: &str,
    batches: &[usize],
    new_tokens: usize,
) -> Result<(BTreeMap<usize, f64>, f64), String> {
    let max_b = batches.iter().copied().max().unwrap_or(1);
    let prompts: Vec<Vec<u32>> = decode_requests(max_b, new_tokens)
        .iter()
        .map(|r| token_ids(llm, r))
        .collect();
    let workload = serde_json::json!({
        "prompts": prompts, "batches": batches, "new_tokens": new_tokens,
        "prefill": token_ids(llm, &prefill_request()),
    });
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let wpath = dir.path().join("workload.json");
    std::fs::write(&wpath, workload.to_string()).map_err(|e| e.to_string())?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/llama_cpp.sh");
    let out = Command::new(script)
        .arg("run")
        .arg(model)
        .arg(&wpath)
        .arg(rayon::current_num_threads().to_string())
        .output()
        .map_err(|e| format!("cannot run {script}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err.lines().last().unwrap_or("failed").to_string());
    }
    let mut decode = BTreeMap::new();
    let mut prefill = 0.0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let rate = v["tok_s"].as_f64().unwrap_or(0.0);
        match v["kind"].as_str() {
            Some("decode") => {
                decode.insert(v["batch"].as_u64().unwrap_or(0) as usize, rate);
            }
            Some("prefill") => prefill = rate,
            _ => {}
        }
    }
    Ok((decode, prefill))
}

/// Run `reqs` with the phase timers on and print where the time went.
fn print_profile(llm: &CandleLlm, label: &str, reqs: &[Request]) {
    profile::reset();
    profile::set_enabled(true);
    llm.clear_prefix_cache();
    let t = Instant::now();
    llm.generate(reqs).unwrap();
    let wall = t.elapsed().as_secs_f64();
    profile::set_enabled(false);
    let phases = profile::snapshot();
    let timed: f64 = phases.iter().map(|p| p.1).sum();
    let mut line = format!("profile {label} ({wall:.2} s):");
    for (p, s) in phases {
        line += &format!(" {p:?} {:.1}%", 100.0 * s / wall);
    }
    line += &format!(
        " | other (scheduler, dispatch) {:.1}%",
        100.0 * (wall - timed).max(0.0) / wall
    );
    println!("{line}");
}

fn ratio(ours: f64, theirs: Option<f64>) -> String {
    match theirs {
        Some(t) if t > 0.0 => format!("{:>9.1} {:>6.2}", t, ours / t),
        _ => format!("{:>9} {:>6}", "-", "-"),
    }
}

fn bench_model(
    model: &str,
    batches: &[usize],
    new_tokens: usize,
    bw: f64,
    peak: Option<f64>,
    with_f32: bool,
) {
    let t = Instant::now();
    let llm = CandleLlm::load(model, EngineOptions::default()).unwrap();
    let load_s = t.elapsed().as_secs_f64();
    let cfg = llm.model().config().clone();
    let wbytes = llm.model().int8_weight_bytes().unwrap_or(0);
    println!(
        "\n== {} — {} layers, hidden {}, {} ({:.0} MB of weights read per step, loaded in {load_s:.1} s)",
        llm.model_id(),
        cfg.n_layers,
        cfg.hidden,
        llm.model().executor(),
        wbytes as f64 / 1e6
    );
    // Rounds alternate ours and llama.cpp, and each engine's best round
    // counts: a shared VM's slow spells then hit both sides alike.
    let rounds = env_list("CANTANTE_BENCH_ROUNDS", &[2])[0].max(1);
    let mut runs: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    let mut llm = llm;
    let mut pre_tokens = 0;
    let mut absent = None;
    for _ in 0..rounds {
        for &b in batches {
            llm.set_max_batch(b);
            let r = decode_rate(&llm, b, new_tokens);
            runs.entry(format!("decode batch {b}"))
                .or_default()
                .0
                .push(r);
        }
        llm.set_max_batch(32);
        let (n, r) = prefill_rate(&llm);
        pre_tokens = n;
        runs.entry("prefill".into()).or_default().0.push(r);
        if absent.is_some() {
            continue;
        }
        match llama_cpp(&llm, model, batches, new_tokens) {
            Ok((d, p)) => {
                for (b, r) in d {
                    runs.entry(format!("decode batch {b}"))
                        .or_default()
                        .1
                        .push(r);
                }
                runs.entry("prefill".into()).or_default().1.push(p);
            }
            Err(e) => absent = Some(e),
        }
    }
    let best = |v: &[f64]| v.iter().copied().reduce(f64::max);
    let span = |v: &[f64]| match v.len() {
        0 | 1 => String::new(),
        _ => {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(0.0, f64::max);
            format!("{lo:.1}-{hi:.1}")
        }
    };
    println!(
        "{:<22} {:>9} {:>9} {:>6}   (best of {rounds} alternating rounds; ranges: ours / llama.cpp)",
        "", "ours", "llama.cpp", "ratio"
    );
    if let Some(e) = &absent {
        println!("(llama.cpp absent: {e}; run benches/llama_cpp.sh setup)");
    }
    let mut ours = BTreeMap::new();
    let mut pre = 0.0;
    let keys: Vec<(String, String)> = batches
        .iter()
        .map(|b| {
            (
                format!("decode batch {b}"),
                format!("decode batch {b} tok/s"),
            )
        })
        .chain([("prefill".to_string(), format!("prefill {pre_tokens} tok/s"))])
        .collect();
    for (key, label) in keys {
        let (o, t) = &runs[&key];
        let r = best(o).unwrap_or(0.0);
        println!(
            "{label:<22} {r:>9.1} {}   {} / {}",
            ratio(r, best(t)),
            span(o),
            span(t)
        );
        match key.strip_prefix("decode batch ") {
            Some(b) => {
                ours.insert(b.parse::<usize>().unwrap(), r);
            }
            None => pre = r,
        }
    }
    let macs = cfg.matmul_params() as f64;
    if let Some(&r1) = ours.get(&1) {
        println!(
            "limits: batch 1 reads {:.0} MB of weights per token -> {:.1} GB/s = {:.0}% of measured bandwidth",
            wbytes as f64 / 1e6,
            wbytes as f64 * r1 / 1e9,
            100.0 * wbytes as f64 * r1 / bw
        );
    }
    if let (Some(peak), Some(&b)) = (peak, batches.iter().max()) {
        let r = ours[&b];
        println!(
            "limits: batch {b} does {:.1} G int8 MAC/s = {:.0}% of the measured int8 peak; prefill {:.0}%",
            macs * r / 1e9,
            100.0 * macs * r / peak,
            100.0 * macs * pre / peak
        );
    }
    for b in [1, 32] {
        llm.set_max_batch(b);
        print_profile(
            &llm,
            &format!("decode batch {b:>2}"),
            &decode_requests(b, new_tokens),
        );
    }
    print_profile(&llm, "prefill", &[prefill_request()]);
    drop(llm);
    if with_f32 && std::env::var("CANTANTE_BENCH_F32").as_deref() != Ok("0") {
        let opts = EngineOptions {
            weights: Some(WeightFormat::F32),
            ..Default::default()
        };
        let mut f = CandleLlm::load(model, opts).unwrap();
        let mut line = String::from("candle f32 executor (--weights f32):");
        for b in [1, 32] {
            f.set_max_batch(b);
            let r = decode_rate(&f, b, new_tokens);
            line += &format!(
                " batch {b} {r:.1} tok/s ({:.2}x int8);",
                r / ours.get(&b).copied().unwrap_or(f64::NAN)
            );
        }
        f.set_max_batch(32);
        let (_, p) = prefill_rate(&f);
        line += &format!(" prefill {p:.1} tok/s ({:.2}x int8)", p / pre);
        println!("{line}");
    }
}

fn main() {
    let batches = env_list("CANTANTE_BENCH_BATCHES", &[1, 8, 32, 64]);
    let new_tokens = env_list("CANTANTE_BENCH_NEW", &[64])[0];
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let bw = bandwidth();
    let peak = int8_peak();
    println!(
        "machine: {cpu}, {} threads, kernel tier {} (available: {:?})",
        rayon::current_num_threads(),
        Tier::active().name(),
        Tier::available()
    );
    println!(
        "measured: streaming read {:.1} GB/s; int8 MAC peak {}{}",
        bw / 1e9,
        peak.map_or("n/a".into(), |p| format!("{:.0} G/s", p / 1e9)),
        vnni512_peak().map_or(String::new(), |p| format!(
            " (256-bit maddubs; 512-bit vpdpbusd: {:.0} G/s)",
            p / 1e9
        ))
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    write_tiny_gguf(&p, TinySpec::default()).unwrap();
    let mut tiny = CandleLlm::load(p.to_str().unwrap(), EngineOptions::default()).unwrap();
    let layers = tiny.model().config().n_layers;
    print!(
        "\n== tiny (2 layers, hidden 64), {}:",
        tiny.model().executor()
    );
    for &b in &batches {
        tiny.set_max_batch(b);
        let r = decode_rate(&tiny, b, 64);
        print!(" batch {b} {r:.0} tok/s;");
        if b == 1 {
            print!(" ({:.0} µs per layer per step)", 1e6 / r / layers as f64);
        }
    }
    println!();
    let home = std::env::var("HOME").unwrap_or_default();
    let models: Vec<String> = match std::env::var("CANTANTE_BENCH_MODELS") {
        Ok(s) => s.split(',').map(str::to_string).collect(),
        Err(_) => [
            "qwen2.5-coder-0.5b-instruct.gguf",
            "qwen2.5-coder-1.5b-instruct.gguf",
        ]
        .iter()
        .map(|f| format!("{home}/.cache/cantante/models/{f}"))
        .collect(),
    };
    for (i, m) in models.iter().enumerate() {
        if std::path::Path::new(m).exists() {
            bench_model(m, &batches, new_tokens, bw, peak, i == 0);
        } else {
            println!("\n({m} not found; run models/fetch.sh [large] to bench it)");
        }
    }
}
