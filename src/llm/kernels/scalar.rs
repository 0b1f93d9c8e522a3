//! Scalar reference of the int8 block dot product. Every SIMD tier must give
//! the same bits. Per block `b` with stored values `u` (see [`Packing`]):
//!
//! - 8-bit packing, and the 6-bit one with `q = u − zero`: the exact integer
//!   `isum = sub₀·Σ₀..₁₅ q·a + sub₁·Σ₁₆..₃₁ q·a` (sub-scales 1 when absent);
//! - 4- and 5-bit packings: `isum = Σ u·a`, plus the offset term
//!   `macc = fma(m − zero·d, d_a·Σa, macc)`;
//!
//! then `acc = fma(isum, d_w·d_a, acc)`, blocks in order; the result is
//! `acc + macc`.

use super::blocks::{ActRow, Packing, QMatrix, QK, TILE};

/// Dot product of weight row `r` with one activation row.
pub fn dot(w: &QMatrix, r: usize, a: &ActRow<'_>) -> f32 {
    let mut acc = 0f32;
    let mut macc = 0f32;
    for b in 0..w.blocks_per_row() {
        let i = w.index(r, b);
        let u = w.values(r, b);
        let aq = &a.qs[b * QK..(b + 1) * QK];
        let isum = match w.packing {
            Packing::U4 | Packing::U5 => (0..QK).map(|e| u[e] as i32 * aq[e] as i32).sum(),
            Packing::I8 | Packing::U6 => {
                let q = |e: usize| match w.packing {
                    Packing::I8 => u[e] as i8 as i32,
                    _ => u[e] as i32 - w.zero as i32,
                };
                let half =
                    |h: usize| -> i32 { (16 * h..16 * h + 16).map(|e| q(e) * aq[e] as i32).sum() };
                let sub = w.sub.as_ref().map_or([1, 1], |s| s[i]);
                half(0) * sub[0] as i32 + half(1) * sub[1] as i32
            }
        };
        acc = (isum as f32).mul_add(w.scale(r, b) * a.d[b], acc);
        if w.has_offset() {
            macc = w.offset(r, b).mul_add(a.s[b], macc);
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
