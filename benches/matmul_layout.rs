//! Which weight layout makes candle's CPU gemm fastest for decode-shaped
//! matmuls (m = batch rows, k = 896, n = 4864, the default model's MLP)?
//! Prints GFLOP/s for `x @ w.t()` (HF layout, transposed view) and `x @ wt`
//! (weights stored pre-transposed, contiguous) and candle's quantized
//! matmuls (Q5_0, Q8_0), for m = 1, 8, 32.
//! Run: `cargo bench --bench matmul_layout`.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
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
    let q5 = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q5_0).unwrap()).unwrap();
    let q8 = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap();
    for m in [1usize, 8, 32] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        let flops = 2.0 * (m * k * n) as f64;
        let a = time(|| {
            x.matmul(&w.t().unwrap()).unwrap();
        });
        let b = time(|| {
            x.matmul(&wt).unwrap();
        });
        let c = time(|| {
            q5.forward(&x).unwrap();
        });
        let d = time(|| {
            q8.forward(&x).unwrap();
        });
        println!(
            "m {m:>2}: f32 x@w.t() {:>6.1}  f32 x@wt {:>6.1}  Q5_0 {:>6.1}  Q8_0 {:>6.1} GFLOP/s",
            flops / a / 1e9,
            flops / b / 1e9,
            flops / c / 1e9,
            flops / d / 1e9
        );
    }
}
