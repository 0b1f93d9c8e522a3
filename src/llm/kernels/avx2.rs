//! AVX2 + FMA tier of the int8 block dot product (x86-64 since Haswell/Zen).
//! One tile (8 weight rows) at a time: per 32-block and weight row, `|w|` and
//! `sign(a, w)` (so `maddubs` multiplies u8 × i8 without saturating: |w| ≤ 128,
//! |a| ≤ 127), `madd` with the sub-scales (or ones) into 8 i32 lanes, then a
//! `hadd` tree folds the 8 rows' lanes into one vector holding each row's exact
//! block sum; one vector FMA per block applies `d_w · d_a` to all 8 rows.
//! Up to four activation rows share each unpacked weight block; from eight rows
//! on, a tile is unpacked to bytes once and every row group reads those.
//! Bit-identical to [`super::scalar`].

#![allow(unsafe_op_in_unsafe_fn)]

use super::blocks::{ActRow, Packing, QMatrix, QK, TILE};
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
    match w.packing {
        Packing::I8 => rows::<0>(w, tile, a, out),
        Packing::U4 => rows::<1>(w, tile, a, out),
        Packing::U5 => rows::<2>(w, tile, a, out),
        Packing::U6 => rows::<3>(w, tile, a, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows<const P: u8>(w: &QMatrix, tile: usize, a: &[ActRow<'_>], out: &mut [[f32; TILE]]) {
    let nb = w.blocks_per_row();
    let bpb = w.packing.bytes();
    let packed = w.qs.as_ptr().add(tile * nb * TILE * bpb);
    if P != 0 && a.len() >= EXPAND_ROWS {
        // Many rows: unpack the tile once and run the byte kernels over it.
        EXPANDED.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.resize(nb * TILE * QK, 0);
            for i in 0..nb * TILE {
                let mut v = load_values::<P>(packed.add(i * bpb));
                if P == 3 {
                    v = _mm256_sub_epi8(v, _mm256_set1_epi8(32));
                }
                _mm256_storeu_si256(buf.as_mut_ptr().add(i * QK) as *mut __m256i, v);
            }
            if P == 3 {
                row_groups::<0>(w, tile, buf.as_ptr(), QK, a, out);
            } else {
                row_groups::<4>(w, tile, buf.as_ptr(), QK, a, out);
            }
        });
    } else {
        row_groups::<P>(w, tile, packed, bpb, a, out);
    }
}

/// Activation rows from which [`rows`] unpacks a tile once instead of per row group.
const EXPAND_ROWS: usize = 8;

thread_local! {
    static EXPANDED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_groups<const P: u8>(
    w: &QMatrix,
    tile: usize,
    qs: *const u8,
    bpb: usize,
    a: &[ActRow<'_>],
    out: &mut [[f32; TILE]],
) {
    const RM: usize = 4;
    let mut j = 0;
    while j + RM <= a.len() {
        let r = kernel::<RM, P>(w, tile, qs, bpb, std::array::from_fn(|k| &a[j + k]));
        for (k, v) in r.iter().enumerate() {
            _mm256_storeu_ps(out[j + k].as_mut_ptr(), *v);
        }
        j += RM;
    }
    while j < a.len() {
        let r = kernel::<1, P>(w, tile, qs, bpb, [&a[j]]);
        _mm256_storeu_ps(out[j].as_mut_ptr(), r[0]);
        j += 1;
    }
}

/// 0xFF in byte `e` where bit `e` of the little-endian u32 at `p` is set (ggml's
/// `bytes_from_bits_32`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn bit_bytes(p: *const u8) -> __m256i {
    let x = std::ptr::read_unaligned(p as *const u32) as i32;
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0x0000000000000000,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// The 32 stored values of the packed block at `p` as bytes (`u`, or `q` for I8).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn load_values<const P: u8>(p: *const u8) -> __m256i {
    if P == 0 || P == 4 {
        return _mm256_loadu_si256(p as *const __m256i);
    }
    let x = _mm_loadu_si128(p as *const __m128i);
    let m4 = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(x, m4);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(x), m4);
    let mut u = _mm256_set_m128i(hi, lo);
    if P >= 2 {
        u = _mm256_or_si256(
            u,
            _mm256_and_si256(bit_bytes(p.add(16)), _mm256_set1_epi8(0x10)),
        );
    }
    if P == 3 {
        u = _mm256_or_si256(
            u,
            _mm256_and_si256(bit_bytes(p.add(20)), _mm256_set1_epi8(0x20)),
        );
    }
    u
}

/// Fold the pairwise `hadd`s of 8 vectors of 8 i32 lanes (`h[k] = hadd(v₂ₖ,
/// v₂ₖ₊₁)`) into one vector of the 8 vectors' totals.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn fold_pairs(h: [__m256i; 4]) -> __m256i {
    let h0123 = _mm256_hadd_epi32(h[0], h[1]);
    let h4567 = _mm256_hadd_epi32(h[2], h[3]);
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(h0123, h4567),
        _mm256_permute2x128_si256::<0x31>(h0123, h4567),
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn kernel<const R: usize, const P: u8>(
    w: &QMatrix,
    tile: usize,
    qs: *const u8,
    bpb: usize,
    a: [&ActRow<'_>; R],
) -> [__m256; R] {
    let nb = w.blocks_per_row();
    let base = tile * nb * TILE;
    let d = w.d.as_ptr().add(base);
    // P: 0 = signed bytes, 1/2/3 = packed U4/U5/U6, 4 = unsigned bytes.
    let unsigned = P == 1 || P == 2 || P == 4;
    let m = w.m.as_ref().map(|m| m.as_ptr().add(base));
    let sub = w.sub.as_ref().map(|s| s.as_ptr().add(base));
    let negz = _mm256_set1_ps(-(w.zero as f32));
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut macc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let mut av = [_mm256_setzero_si256(); R];
        for r in 0..R {
            av[r] = _mm256_loadu_si256(a[r].qs.as_ptr().add(b * QK) as *const __m256i);
        }
        let wb = qs.add(b * TILE * bpb);
        // Column pairs are folded as soon as they are computed (hadd), which
        // keeps the live registers at about 4·R.
        let mut h = [[_mm256_setzero_si256(); 4]; R];
        for pair in 0..TILE / 2 {
            let mut v = [[_mm256_setzero_si256(); 2]; R];
            for k in 0..2 {
                let c = 2 * pair + k;
                let mut wv = load_values::<P>(wb.add(c * bpb));
                let scale = match sub {
                    Some(s) => {
                        let s = *s.add(b * TILE + c);
                        _mm256_set_m128i(_mm_set1_epi16(s[1]), _mm_set1_epi16(s[0]))
                    }
                    None => ones,
                };
                if unsigned {
                    for r in 0..R {
                        v[r][k] = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, av[r]), scale);
                    }
                } else {
                    if P == 3 {
                        wv = _mm256_sub_epi8(wv, _mm256_set1_epi8(32));
                    }
                    let aw = _mm256_sign_epi8(wv, wv);
                    for r in 0..R {
                        let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(av[r], wv));
                        v[r][k] = _mm256_madd_epi16(p, scale);
                    }
                }
            }
            for r in 0..R {
                h[r][pair] = _mm256_hadd_epi32(v[r][0], v[r][1]);
            }
        }
        let dw = _mm256_loadu_ps(d.add(b * TILE));
        let off = if unsigned {
            let mv = m.map_or(_mm256_setzero_ps(), |m| _mm256_loadu_ps(m.add(b * TILE)));
            _mm256_fmadd_ps(negz, dw, mv)
        } else {
            _mm256_setzero_ps()
        };
        for r in 0..R {
            let isum = fold_pairs(h[r]);
            let dd = _mm256_mul_ps(dw, _mm256_set1_ps(*a[r].d.get_unchecked(b)));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), dd, acc[r]);
            if unsigned {
                macc[r] = _mm256_fmadd_ps(off, _mm256_set1_ps(*a[r].s.get_unchecked(b)), macc[r]);
            }
        }
    }
    if unsigned {
        for r in 0..R {
            acc[r] = _mm256_add_ps(acc[r], macc[r]);
        }
    }
    acc
}
