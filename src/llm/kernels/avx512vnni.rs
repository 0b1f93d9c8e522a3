//! AVX-512 VNNI tier (Ice Lake and Sapphire Rapids Xeons, Zen 4 and later):
//! the AVX2 tier's tiles and block layout on 256-bit vectors, with one
//! `vpdpbusd` (EVEX, AVX-512VL) in place of each `maddubs` + `madd` pair;
//! from eight activation rows on, 4-, 5- and 6-bit tiles run a 512-bit
//! kernel ([`kernel_pairs`]) that handles two activation rows per register.
//! Same exact integer lanes, so bit-identical to [`super::scalar`].

#![allow(unsafe_op_in_unsafe_fn)]

use super::avx2::{self, ScalePtr};
use super::blocks::{ActRow, Packing, QMatrix, QK, TILE};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether this CPU can run the tier.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2::available()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[j][c] = w[tile·8 + c] · a[j]`. Caller guarantees [`available`].
#[cfg(target_arch = "x86_64")]
pub unsafe fn tile_rows(w: &QMatrix, tile: usize, a: &[ActRow<'_>], out: &mut [[f32; TILE]]) {
    avx2::by_packing!(rows, w, tile, a, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows<const P: u8>(w: &QMatrix, tile: usize, a: &[ActRow<'_>], out: &mut [[f32; TILE]]) {
    if P == 0 || a.len() < avx2::EXPAND_ROWS {
        return avx2::rows::<P, { avx2::DPBUSD_EVEX }>(w, tile, a, out);
    }
    let buf = avx2::expand::<P, true>(w, tile);
    let mut j = 0;
    while j + 4 <= a.len() {
        let r = kernel_pairs::<2, P>(w, tile, buf, [[&a[j], &a[j + 1]], [&a[j + 2], &a[j + 3]]]);
        // Rows j..j+3 of `out` are contiguous: each register fills two
        // (pointers from the whole slice, which the stores stay inside).
        let o = out.as_mut_ptr().add(j) as *mut f32;
        _mm512_storeu_ps(o, r[0]);
        _mm512_storeu_ps(o.add(2 * TILE), r[1]);
        j += 4;
    }
    if j + 2 <= a.len() {
        let r = kernel_pairs::<1, P>(w, tile, buf, [[&a[j], &a[j + 1]]]);
        _mm512_storeu_ps(out.as_mut_ptr().add(j) as *mut f32, r[0]);
        j += 2;
    }
    if j < a.len() {
        // A last single row runs paired with itself; the copy is dropped.
        let r = kernel_pairs::<1, P>(w, tile, buf, [[&a[j], &a[j]]]);
        _mm256_storeu_ps(out[j].as_mut_ptr(), _mm512_castps512_ps256(r[0]));
    }
}

/// `[x; 8]` then `[y; 8]`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn halves_ps(x: f32, y: f32) -> __m512 {
    _mm512_mask_mov_ps(_mm512_set1_ps(x), 0xFF00, _mm512_set1_ps(y))
}

/// `[x; 8]` then `[y; 8]`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn halves_epi32(x: i32, y: i32) -> __m512i {
    _mm512_mask_set1_epi32(_mm512_set1_epi32(x), 0xFF00, y)
}

/// A 256-bit vector in both halves.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn both_ps(v: __m256) -> __m512 {
    _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(v)))
}

/// The tile product over a pair-interleaved unpacked tile ([`avx2::expand`]
/// with `PAIRS`) for `R` pairs of activation rows, one 512-bit register per
/// pair and quantity: per block, 64-byte word `k` holds row `c`'s values
/// `8k..8k+3` in lane `2c` and `8k+4..8k+7` in lane `2c+1`, so one
/// `vpdpbusd` with the activation row's 8 bytes `8k..8k+7` broadcast to
/// every 64-bit lane adds 4 products to each lane. Per block two
/// `vpermt2d`s and an add fold the lane pairs of both rows of a pair into
/// one register (row `c` of the pair's first row in lane `c`, of its second
/// in lane `8 + c`), which holds the exact block sums of [`super::scalar`];
/// the float steps are [`avx2`]'s, lane for lane, on both rows at once.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn kernel_pairs<const R: usize, const P: u8>(
    w: &QMatrix,
    tile: usize,
    buf: *const u8,
    a: [[&ActRow<'_>; 2]; R],
) -> [__m512; R] {
    let nb = w.blocks_per_row();
    let (d, m) = ScalePtr::tile(w, tile);
    let negz = _mm256_set1_ps(-(w.zero as f32));
    let sub = avx2::sub_ptr::<P>(w, tile);
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let fold = |x: __m512i, y: __m512i| {
        _mm512_add_epi32(
            _mm512_permutex2var_epi32(x, even, y),
            _mm512_permutex2var_epi32(x, odd, y),
        )
    };
    let mut acc = [_mm512_setzero_ps(); R];
    let mut macc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let wb = buf.add(b * TILE * QK);
        // Values 0–15 (h0) and 16–31 (h1) of each row of each pair.
        let mut h0 = [[_mm512_setzero_si512(); 2]; R];
        let mut h1 = [[_mm512_setzero_si512(); 2]; R];
        for k in 0..TILE / 2 {
            let wv = _mm512_loadu_si512(wb.add(k * 64) as *const _);
            for r in 0..R {
                for e in 0..2 {
                    let q =
                        (a[r][e].qs.as_ptr().add(b * QK + 8 * k) as *const i64).read_unaligned();
                    let av = _mm512_set1_epi64(q);
                    if k < 2 {
                        h0[r][e] = _mm512_dpbusd_epi32(h0[r][e], wv, av);
                    } else {
                        h1[r][e] = _mm512_dpbusd_epi32(h1[r][e], wv, av);
                    }
                }
            }
        }
        let dw = d.load(b);
        let dw2 = both_ps(dw);
        let (sub0, sub1) = if P == 3 {
            let (s0, s1) = avx2::sub_lanes(sub, b);
            (_mm512_broadcast_i64x4(s0), _mm512_broadcast_i64x4(s1))
        } else {
            (_mm512_setzero_si512(), _mm512_setzero_si512())
        };
        let off = if P == 3 {
            None
        } else {
            Some(both_ps(avx2::offset(m, negz, dw, b)))
        };
        for r in 0..R {
            let [x, y] = a[r];
            let isum = if P == 3 {
                let [x0, x1] = *x.h.get_unchecked(b);
                let [y0, y1] = *y.h.get_unchecked(b);
                let z0 = _mm512_sub_epi32(
                    fold(h0[r][0], h0[r][1]),
                    halves_epi32(32 * x0 as i32, 32 * y0 as i32),
                );
                let z1 = _mm512_sub_epi32(
                    fold(h1[r][0], h1[r][1]),
                    halves_epi32(32 * x1 as i32, 32 * y1 as i32),
                );
                _mm512_add_epi32(_mm512_mullo_epi32(z0, sub0), _mm512_mullo_epi32(z1, sub1))
            } else {
                fold(
                    _mm512_add_epi32(h0[r][0], h1[r][0]),
                    _mm512_add_epi32(h0[r][1], h1[r][1]),
                )
            };
            let da = halves_ps(*x.d.get_unchecked(b), *y.d.get_unchecked(b));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw2, da), acc[r]);
            if let Some(off) = off {
                let sa = halves_ps(*x.s.get_unchecked(b), *y.s.get_unchecked(b));
                macc[r] = _mm512_fmadd_ps(off, sa, macc[r]);
            }
        }
    }
    for r in 0..R {
        acc[r] = _mm512_add_ps(acc[r], macc[r]);
    }
    acc
}
