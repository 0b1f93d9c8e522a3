//! Which weight layout makes candle's CPU gemm fastest for decode-shaped
//! matmuls (m = batch rows, k = 896, n = 4864, the default model's MLP)?
//! Prints GFLOP/s for `x @ w.t()` (HF layout, transposed view) and `x @ wt`
//! (weights stored pre-transposed, contiguous), for m = 1, 8, 32.
//! Run: `cargo bench --bench matmul_layout`.

use candle_core::{Device, Tensor};
use std::time::Instant;

fn time(f: impl Fn()) -> f64 {
    f();
    let reps = 20;
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn main() {
    let (k, n) = (896, 4864);
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
    let wt = w.t().unwrap().contiguous().unwrap();
    for m in [1usize, 8, 32] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        let flops = 2.0 * (m * k * n) as f64;
        let a = time(|| {
            x.matmul(&w.t().unwrap()).unwrap();
        });
        let b = time(|| {
            x.matmul(&wt).unwrap();
        });
        println!(
            "m {m:>2}: x@w.t() {:>6.1} GFLOP/s   x@wt {:>6.1} GFLOP/s   ratio {:.2}",
            flops / a / 1e9,
            flops / b / 1e9,
            a / b
        );
    }
}
