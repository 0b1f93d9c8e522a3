//! Opt-in phase timers for the engine (`CANTANTE_PROFILE=1`, or
//! [`set_enabled`]): wall time per phase of the forward pass and of the
//! scheduler, summed over all calls, for `cargo bench --bench engine` and for
//! users who want to know where a step's time goes. Off by default: one relaxed
//! atomic load per phase.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// A timed phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Embedding lookup (row dequantization).
    Embed,
    /// RMSNorm and activation quantization.
    NormQuant,
    /// q|k|v, output, gate|up, down and lm-head weight matmuls.
    Matmul,
    /// Bias, RoPE and appending k/v to the KV buffers.
    RopeKv,
    /// Attention over the KV buffers.
    Attention,
    /// SiLU·mul and residual adds.
    Elementwise,
    /// Sampling the next token from the logits.
    Sampling,
    /// Tokenizer work while decoding (stop strings, final text).
    Tokenizer,
}

/// Every phase, in report order.
pub const PHASES: [Phase; 8] = [
    Phase::Embed,
    Phase::NormQuant,
    Phase::Matmul,
    Phase::RopeKv,
    Phase::Attention,
    Phase::Elementwise,
    Phase::Sampling,
    Phase::Tokenizer,
];

static NANOS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
static ON: AtomicBool = AtomicBool::new(false);
static INIT: OnceLock<()> = OnceLock::new();

fn init() {
    INIT.get_or_init(|| {
        if std::env::var("CANTANTE_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0") {
            ON.store(true, Ordering::Relaxed);
        }
    });
}

/// Turn the timers on or off.
pub fn set_enabled(on: bool) {
    init();
    ON.store(on, Ordering::Relaxed);
}

/// Whether the timers run.
pub fn enabled() -> bool {
    init();
    ON.load(Ordering::Relaxed)
}

/// Run `f`, adding its wall time to `phase` when enabled.
#[inline]
pub fn time<T>(phase: Phase, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let t = Instant::now();
    let r = f();
    NANOS[phase as usize].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    r
}

/// Seconds per phase since the last [`reset`].
pub fn snapshot() -> Vec<(Phase, f64)> {
    PHASES
        .iter()
        .map(|&p| (p, NANOS[p as usize].load(Ordering::Relaxed) as f64 * 1e-9))
        .collect()
}

/// Zero the timers.
pub fn reset() {
    for n in &NANOS {
        n.store(0, Ordering::Relaxed);
    }
}
