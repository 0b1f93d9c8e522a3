//! Scalar reference of the int8 block dot product. Every SIMD tier must give
//! the same bits. Per block `b`: the exact integer sum
//! `isum = sub₀·Σ₀..₁₅ w·a + sub₁·Σ₁₆..₃₁ w·a`, then
//! `acc = fma(isum, d_w·d_a, acc)` and, for formats with an offset,
//! `macc = fma(m, d_a·Σa, macc)`, blocks in order; the result is `acc + macc`.

use super::blocks::{ActRow, QMatrix, QK, TILE};

/// Dot product of weight row `r` with one activation row.
pub fn dot(w: &QMatrix, r: usize, a: &ActRow<'_>) -> f32 {
    let mut acc = 0f32;
    let mut macc = 0f32;
    for b in 0..w.blocks_per_row() {
        let i = w.index(r, b);
        let wq = &w.qs[i * QK..(i + 1) * QK];
        let aq = &a.qs[b * QK..(b + 1) * QK];
        let half = |h: usize| -> i32 {
            (16 * h..16 * h + 16)
                .map(|e| wq[e] as i32 * aq[e] as i32)
                .sum()
        };
        let sub = w.sub.as_ref().map_or([1, 1], |s| s[i]);
        let isum = half(0) * sub[0] as i32 + half(1) * sub[1] as i32;
        acc = (isum as f32).mul_add(w.d[i] * a.d[b], acc);
        if let Some(m) = &w.m {
            macc = m[i].mul_add(a.s[b], macc);
        }
    }
    acc + macc
}

/// `out[j][c] = dot(w, tile·8 + c, a[j])` for the 8 rows of one tile.
pub fn tile_rows(w: &QMatrix, tile: usize, a: &[ActRow<'_>], out: &mut [[f32; TILE]]) {
    for (o, a) in out.iter_mut().zip(a) {
        for (c, v) in o.iter_mut().enumerate() {
            *v = dot(w, tile * TILE + c, a);
        }
    }
}
