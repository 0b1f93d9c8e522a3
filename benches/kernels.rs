//! Int8 kernel throughput (run: `cargo bench --bench kernels`): G multiply-adds
//! per second of [`cantante::llm::kernels::matmul`] per tier and weight flavour,
//! at decode- and prefill-shaped sizes of the default model's MLP (k = 896,
//! n = 4864), with all threads; then the 1.5B model's own shapes at
//! prefill- and batch-shaped sizes (its `ffn_down` has k = 8960: activation
//! rows no longer fit in L2 there).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use cantante::llm::kernels::{matmul, QActs, QMatrix, Tier};
use std::time::Instant;

fn main() {
    let (n, k) = (4864, 1024);
    let vals: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919) % 255) as f32 / 127.0 - 1.0)
        .collect();
    let t = Tensor::from_vec(vals, (n, k), &Device::Cpu).unwrap();
    let mats: Vec<(String, QMatrix)> = [
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5_0,
        GgmlDType::Q6K,
    ]
    .iter()
    .map(|&dt| {
        let q = QTensor::quantize(&t, dt).unwrap();
        (format!("{dt:?}"), QMatrix::from_qtensor(&q).unwrap())
    })
    .collect();
    for tier in Tier::available() {
        for (name, w) in &mats {
            let mut line = format!(
                "{:<7} {name:<5} ({:.2} B/weight)",
                tier.name(),
                w.bytes() as f64 / (n * k) as f64
            );
            for t in [1, 4, 32, 256] {
                let s = seconds_per_matmul(tier, w, t, (64 / t).max(2));
                line += &format!(
                    "  m={t}: {:.1} GMAC/s ({:.2} ms)",
                    (t * n * k) as f64 / s / 1e9,
                    s * 1e3
                );
                if tier == Tier::Scalar && t >= 4 {
                    break;
                }
            }
            println!("{line}");
        }
        // Decode from DRAM: 24 matrices (far beyond the caches), m = 1.
        let many: Vec<QMatrix> = (0..24).map(|i| mats[i % mats.len()].1.clone()).collect();
        let x: Vec<f32> = (0..k)
            .map(|i| ((i * 31) % 97) as f32 / 50.0 - 1.0)
            .collect();
        let mut acts = QActs::default();
        acts.quantize(&x, 1, k);
        let mut out = vec![0f32; n];
        let bytes: usize = many.iter().map(QMatrix::bytes).sum();
        let start = Instant::now();
        for _ in 0..3 {
            for w in &many {
                matmul(tier, w, &acts, &mut out, n);
            }
        }
        let s = start.elapsed().as_secs_f64() / 3.0;
        println!(
            "{:<7} m=1 streaming {} MB: {:.1} GB/s, {:.1} GMAC/s",
            tier.name(),
            bytes / 1_000_000,
            bytes as f64 / s / 1e9,
            (24 * n * k) as f64 / s / 1e9
        );
    }
    // The 1.5B model's matrices (Q4_K_M: Q4_K, half the ffn_down and attn_v Q6_K).
    let tier = *Tier::available().last().unwrap();
    for (name, n, k, dt) in [
        ("qkv", 2048, 1536, GgmlDType::Q4K),
        ("gate|up", 17920, 1536, GgmlDType::Q4K),
        ("down", 1536, 8960, GgmlDType::Q4K),
        ("down", 1536, 8960, GgmlDType::Q6K),
    ] {
        let vals: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 255) as f32 / 127.0 - 1.0)
            .collect();
        let t = Tensor::from_vec(vals, (n, k), &Device::Cpu).unwrap();
        let w = QMatrix::from_qtensor(&QTensor::quantize(&t, dt).unwrap()).unwrap();
        let mut line = format!("{:<7} 1.5B {name:<7} {dt:?} {n}x{k}", tier.name());
        for t in [32, 64, 256] {
            let s = seconds_per_matmul(tier, &w, t, (1024 / t).max(2));
            line += &format!("  m={t}: {:.1} GMAC/s", (t * n * k) as f64 / s / 1e9);
        }
        println!("{line}");
    }
}

/// Mean seconds of one `matmul` of `w` with `t` activation rows (after one
/// warm-up call) over `reps` calls.
fn seconds_per_matmul(tier: Tier, w: &QMatrix, t: usize, reps: usize) -> f64 {
    let (n, k) = (w.rows, w.cols);
    let x: Vec<f32> = (0..t * k)
        .map(|i| ((i * 31) % 97) as f32 / 50.0 - 1.0)
        .collect();
    let mut acts = QActs::default();
    acts.quantize(&x, t, k);
    let mut out = vec![0f32; t * n];
    matmul(tier, w, &acts, &mut out, n);
    let start = Instant::now();
    for _ in 0..reps {
        matmul(tier, w, &acts, &mut out, n);
    }
    start.elapsed().as_secs_f64() / reps as f64
}
