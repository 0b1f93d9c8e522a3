//! AVX2 + FMA tier of the int8 block dot product (x86-64 since Haswell/Zen).
//! One tile (8 weight rows) at a time: per 32-block and weight row, `|w|` and
//! `sign(a, w)` (so `maddubs` multiplies u8 × i8 without saturating: |w| ≤ 128,
//! |a| ≤ 127), `madd` with the sub-scales (or ones) into 8 i32 lanes, then a
//! `hadd` tree folds the 8 rows' lanes into one vector holding each row's exact
//! block sum; one vector FMA per block applies `d_w · d_a` to all 8 rows.
//! Activation rows are processed in pairs sharing the weight loads.
//! Bit-identical to [`super::scalar`].

#![allow(unsafe_op_in_unsafe_fn)]

use super::blocks::{ActRow, QMatrix, QK, TILE};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether this CPU can run the tier.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[j][c] = w[tile·8 + c] · a[j]`. Caller guarantees [`available`].
#[cfg(target_arch = "x86_64")]
pub unsafe fn tile_rows(w: &QMatrix, tile: usize, a: &[ActRow<'_>], out: &mut [[f32; TILE]]) {
    match (w.sub.is_some(), w.m.is_some()) {
        (false, false) => rows::<false, false>(w, tile, a, out),
        (false, true) => rows::<false, true>(w, tile, a, out),
        (true, false) => rows::<true, false>(w, tile, a, out),
        (true, true) => rows::<true, true>(w, tile, a, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows<const SUB: bool, const MIN: bool>(
    w: &QMatrix,
    tile: usize,
    a: &[ActRow<'_>],
    out: &mut [[f32; TILE]],
) {
    let mut j = 0;
    while j + 2 <= a.len() {
        let r = kernel::<2, SUB, MIN>(w, tile, [&a[j], &a[j + 1]]);
        for (k, v) in r.iter().enumerate() {
            _mm256_storeu_ps(out[j + k].as_mut_ptr(), *v);
        }
        j += 2;
    }
    if j < a.len() {
        let r = kernel::<1, SUB, MIN>(w, tile, [&a[j]]);
        _mm256_storeu_ps(out[j].as_mut_ptr(), r[0]);
    }
}

/// Fold 8 vectors of 8 i32 lanes into one vector of their 8 totals.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn fold8(v: [__m256i; 8]) -> __m256i {
    let h01 = _mm256_hadd_epi32(v[0], v[1]);
    let h23 = _mm256_hadd_epi32(v[2], v[3]);
    let h45 = _mm256_hadd_epi32(v[4], v[5]);
    let h67 = _mm256_hadd_epi32(v[6], v[7]);
    let h0123 = _mm256_hadd_epi32(h01, h23);
    let h4567 = _mm256_hadd_epi32(h45, h67);
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(h0123, h4567),
        _mm256_permute2x128_si256::<0x31>(h0123, h4567),
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn kernel<const R: usize, const SUB: bool, const MIN: bool>(
    w: &QMatrix,
    tile: usize,
    a: [&ActRow<'_>; R],
) -> [__m256; R] {
    let nb = w.blocks_per_row();
    let base = tile * nb * TILE;
    let qs = w.qs.as_ptr().add(base * QK);
    let d = w.d.as_ptr().add(base);
    let m = if MIN { w.m.as_ref().unwrap_unchecked().as_ptr().add(base) } else { d };
    let sub = if SUB { w.sub.as_ref().unwrap_unchecked().as_ptr().add(base) } else { std::ptr::null() };
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut macc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let mut av = [_mm256_setzero_si256(); R];
        for r in 0..R {
            av[r] = _mm256_loadu_si256(a[r].qs.as_ptr().add(b * QK) as *const __m256i);
        }
        let wb = qs.add(b * TILE * QK);
        let mut v = [[_mm256_setzero_si256(); 8]; R];
        for c in 0..TILE {
            let wv = _mm256_loadu_si256(wb.add(c * QK) as *const __m256i);
            let aw = _mm256_sign_epi8(wv, wv);
            let scale = if SUB {
                let s = *sub.add(b * TILE + c);
                _mm256_set_m128i(_mm_set1_epi16(s[1]), _mm_set1_epi16(s[0]))
            } else {
                ones
            };
            for r in 0..R {
                let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(av[r], wv));
                v[r][c] = _mm256_madd_epi16(p, scale);
            }
        }
        let dw = _mm256_loadu_ps(d.add(b * TILE));
        for r in 0..R {
            let isum = fold8(v[r]);
            let dd = _mm256_mul_ps(dw, _mm256_set1_ps(*a[r].d.get_unchecked(b)));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), dd, acc[r]);
            if MIN {
                let mv = _mm256_loadu_ps(m.add(b * TILE));
                macc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(*a[r].s.get_unchecked(b)), macc[r]);
            }
        }
    }
    if MIN {
        for r in 0..R {
            acc[r] = _mm256_add_ps(acc[r], macc[r]);
        }
    }
    acc
}
