//! AVX2 + FMA tier of the int8 block dot product (x86-64 since Haswell/Zen).
//! Per 32-block: `|w|` and `sign(a, w)` (so `maddubs` multiplies u8 × i8 without
//! saturating: |w| ≤ 128, |a| ≤ 127), `madd` with the sub-scales (or ones) into
//! 8 i32 lanes, one FMA per lane with `d_w · d_a`. One weight block is loaded once
//! for up to four activation rows. Bit-identical to [`super::scalar`].

#![allow(unsafe_op_in_unsafe_fn)]

use super::blocks::{ActRow, RowView, QK};
use super::scalar::hsum8;
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

/// `out[r] = dot(w, a[r])`. Caller guarantees [`available`].
#[cfg(target_arch = "x86_64")]
pub unsafe fn dot_rows(w: &RowView<'_>, a: &[ActRow<'_>], out: &mut [f32]) {
    match (w.sub.is_some(), w.m.is_some()) {
        (false, false) => rows::<false, false>(w, a, out),
        (false, true) => rows::<false, true>(w, a, out),
        (true, false) => rows::<true, false>(w, a, out),
        (true, true) => rows::<true, true>(w, a, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows<const SUB: bool, const MIN: bool>(
    w: &RowView<'_>,
    a: &[ActRow<'_>],
    out: &mut [f32],
) {
    let mut i = 0;
    while i + 4 <= a.len() {
        let r = tile::<4, SUB, MIN>(w, [&a[i], &a[i + 1], &a[i + 2], &a[i + 3]]);
        out[i..i + 4].copy_from_slice(&r);
        i += 4;
    }
    while i < a.len() {
        out[i] = tile::<1, SUB, MIN>(w, [&a[i]])[0];
        i += 1;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const R: usize, const SUB: bool, const MIN: bool>(
    w: &RowView<'_>,
    a: [&ActRow<'_>; R],
) -> [f32; R] {
    let nb = w.d.len();
    let mut acc = [_mm256_setzero_ps(); R];
    let mut macc = [0f32; R];
    let ones = _mm256_set1_epi16(1);
    let wp = w.qs.as_ptr();
    for b in 0..nb {
        let wv = _mm256_loadu_si256(wp.add(b * QK) as *const __m256i);
        let aw = _mm256_sign_epi8(wv, wv);
        let scale = if SUB {
            let s = w.sub.unwrap_unchecked().get_unchecked(b);
            _mm256_set_m128i(_mm_set1_epi16(s[1]), _mm_set1_epi16(s[0]))
        } else {
            ones
        };
        let dw = *w.d.get_unchecked(b);
        for r in 0..R {
            let av = _mm256_loadu_si256(a[r].qs.as_ptr().add(b * QK) as *const __m256i);
            let sv = _mm256_sign_epi8(av, wv);
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sv), scale);
            let dd = _mm256_set1_ps(dw * *a[r].d.get_unchecked(b));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dd, acc[r]);
            if MIN {
                macc[r] =
                    w.m.unwrap_unchecked()
                        .get_unchecked(b)
                        .mul_add(*a[r].s.get_unchecked(b), macc[r]);
            }
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r]);
        out[r] = hsum8(lanes) + macc[r];
    }
    out
}
