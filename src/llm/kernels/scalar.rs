//! Scalar reference of the int8 block dot product. Every SIMD tier must give
//! the same bits: per block, the integer sums of 8 lanes of 4 consecutive
//! products (times the block's integer sub-scale), one fused multiply-add per
//! lane with `d_w · d_a`, the offset term `m · (d_a Σq_a)` in a scalar fused
//! multiply-add, and a fixed horizontal sum at the end ([`hsum8`]).

use super::blocks::{ActRow, RowView, QK};

/// The fixed horizontal sum order of 8 lanes (the order of a 256-bit register
/// folded high-to-low: 128-bit halves, then 64-bit halves, then the last pair).
#[inline(always)]
pub fn hsum8(a: [f32; 8]) -> f32 {
    let x = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let y = [x[0] + x[2], x[1] + x[3]];
    y[0] + y[1]
}

/// Dot product of one weight row with one activation row.
pub fn dot(w: &RowView<'_>, a: &ActRow<'_>) -> f32 {
    let mut acc = [0f32; 8];
    let mut macc = 0f32;
    for b in 0..w.d.len() {
        let sub = w.sub.map_or([1, 1], |s| s[b]);
        let dd = w.d[b] * a.d[b];
        let (wq, aq) = (&w.qs[b * QK..(b + 1) * QK], &a.qs[b * QK..(b + 1) * QK]);
        for (lane, acc) in acc.iter_mut().enumerate() {
            let mut s = 0i32;
            for e in 4 * lane..4 * lane + 4 {
                s += wq[e] as i32 * aq[e] as i32;
            }
            let s = s * sub[lane / 4] as i32;
            *acc = (s as f32).mul_add(dd, *acc);
        }
        if let Some(m) = w.m {
            macc = m[b].mul_add(a.s[b], macc);
        }
    }
    hsum8(acc) + macc
}

/// `out[r] = dot(w, a[r])` for each activation row.
pub fn dot_rows(w: &RowView<'_>, a: &[ActRow<'_>], out: &mut [f32]) {
    for (o, a) in out.iter_mut().zip(a) {
        *o = dot(w, a);
    }
}
