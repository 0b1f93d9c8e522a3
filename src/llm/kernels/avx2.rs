//! AVX2 + FMA tier of the int8 block dot product (x86-64 since Haswell/Zen).
//! One tile (8 weight rows) at a time: per 32-block and weight row, `|w|` and
//! `sign(a, w)` (so `maddubs` multiplies u8 × i8 without saturating: |w| ≤ 128,
//! |a| ≤ 127), `madd` with the sub-scales (or ones) into 8 i32 lanes, then a
//! `hadd` tree folds the 8 rows' lanes into one vector holding each row's exact
//! block sum; one vector FMA per block applies `d_w · d_a` to all 8 rows.
//! Up to four activation rows share each unpacked weight block. From eight
//! activation rows on, a 4-, 5- or 6-bit tile is unpacked once into a
//! row-interleaved buffer (4 values of each of the 8 rows per 32-byte word),
//! where one `u8 × i8` product of a word with a broadcast activation word
//! leaves each row's partial sum in its own lane: no fold per block (about
//! twice the multiply-adds per second of the folded form in prefill).
//! Bit-identical to [`super::scalar`].
//!
//! The kernel bodies are generic over how a 32-byte `u8 × i8` product is
//! reduced to 8 `i32` lanes of 4 products each (`D`): `maddubs` + `madd`
//! here ([`MADD`]), one `vpdpbusd` in the VNNI tiers ([`super::avxvnni`],
//! [`super::avx512vnni`]), which reuse these bodies from their own
//! `target_feature` entry points. The lanes hold the same exact integers
//! either way, so every tier gives the same bits.

#![allow(unsafe_op_in_unsafe_fn)]

use super::blocks::{
    ActRow, Packing, QMatrix, Scales, HI_GROUP, HI_GROUP6, HI_PAIR_BYTES, QK, SUPER, TILE,
};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether this CPU can run the tier.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Call `$rows::<P>(w, tile, a, out)` with the packing index `P` of `w`
/// (0 = [`Packing::I8`], 1 = U4, 2 = U5, 3 = U6): each tier's entry point.
macro_rules! by_packing {
    ($rows:ident, $w:expr, $tile:expr, $a:expr, $out:expr) => {
        match $w.packing {
            Packing::I8 => $rows::<0>($w, $tile, $a, $out),
            Packing::U4 => $rows::<1>($w, $tile, $a, $out),
            Packing::U5 => $rows::<2>($w, $tile, $a, $out),
            Packing::U6 => $rows::<3>($w, $tile, $a, $out),
        }
    };
}
pub(super) use by_packing;

/// `out[j][c] = w[tile·8 + c] · a[j]`. Caller guarantees [`available`].
#[cfg(target_arch = "x86_64")]
pub unsafe fn tile_rows(w: &QMatrix, tile: usize, a: &[ActRow<'_>], out: &mut [[f32; TILE]]) {
    by_packing!(rows_avx2, w, tile, a, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2<const P: u8>(
    w: &QMatrix,
    tile: usize,
    a: &[ActRow<'_>],
    out: &mut [[f32; TILE]],
) {
    rows::<P, MADD>(w, tile, a, out)
}

/// Reduction of `u8 × i8` products: `maddubs` + `madd` (AVX2).
pub const MADD: u8 = 0;
/// Reduction of `u8 × i8` products: `vpdpbusd` (AVX-512 VNNI, 256-bit).
pub const DPBUSD_EVEX: u8 = 1;
/// Reduction of `u8 × i8` products: `vpdpbusd` (AVX-VNNI).
pub const DPBUSD_VEX: u8 = 2;

/// `Σ₄ u·s` per `i32` lane (u unsigned, s signed bytes; 4 consecutive
/// bytes per lane). With [`MADD`], `|u·s|` pairs must fit `i16` (they do for
/// every packing: `|w| ≤ 128`, `|a| ≤ 127`). `D` ≠ [`MADD`] needs the
/// caller to have the matching VNNI target feature (the bodies are inlined
/// into such an entry point).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot<const D: u8>(u: __m256i, s: __m256i) -> __m256i {
    match D {
        MADD => _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)),
        DPBUSD_EVEX => _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s),
        _ => _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s),
    }
}

/// `Σ₄ (u₁·s₁ + u₂·s₂)` per `i32` lane, as [`dot`] (with [`MADD`] the two
/// products are summed in `i16` first: ≤ 2·2·31·127 for 5-bit values).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot2<const D: u8>(u1: __m256i, s1: __m256i, u2: __m256i, s2: __m256i) -> __m256i {
    match D {
        MADD => _mm256_madd_epi16(
            _mm256_add_epi16(_mm256_maddubs_epi16(u1, s1), _mm256_maddubs_epi16(u2, s2)),
            _mm256_set1_epi16(1),
        ),
        DPBUSD_EVEX => {
            _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u1, s1), u2, s2)
        }
        _ => _mm256_dpbusd_avx_epi32(
            _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u1, s1),
            u2,
            s2,
        ),
    }
}

/// `acc + Σ₄ u·s` per `i32` lane, as [`dot`] (one `vpdpbusd` in the VNNI tiers).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_acc<const D: u8>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    match D {
        MADD => _mm256_add_epi32(acc, dot::<MADD>(u, s)),
        DPBUSD_EVEX => _mm256_dpbusd_epi32(acc, u, s),
        _ => _mm256_dpbusd_avx_epi32(acc, u, s),
    }
}

/// Transpose 8 rows of 8 four-byte words: output `g` holds word `g` of rows
/// 0–7, row `c` in 32-bit lane `c`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn transpose_words(v: [__m256i; 8]) -> [__m256i; 8] {
    let a0 = _mm256_unpacklo_epi32(v[0], v[1]);
    let a1 = _mm256_unpackhi_epi32(v[0], v[1]);
    let a2 = _mm256_unpacklo_epi32(v[2], v[3]);
    let a3 = _mm256_unpackhi_epi32(v[2], v[3]);
    let a4 = _mm256_unpacklo_epi32(v[4], v[5]);
    let a5 = _mm256_unpackhi_epi32(v[4], v[5]);
    let a6 = _mm256_unpacklo_epi32(v[6], v[7]);
    let a7 = _mm256_unpackhi_epi32(v[6], v[7]);
    let b0 = _mm256_unpacklo_epi64(a0, a2);
    let b1 = _mm256_unpackhi_epi64(a0, a2);
    let b2 = _mm256_unpacklo_epi64(a1, a3);
    let b3 = _mm256_unpackhi_epi64(a1, a3);
    let b4 = _mm256_unpacklo_epi64(a4, a6);
    let b5 = _mm256_unpackhi_epi64(a4, a6);
    let b6 = _mm256_unpacklo_epi64(a5, a7);
    let b7 = _mm256_unpackhi_epi64(a5, a7);
    [
        _mm256_permute2x128_si256::<0x20>(b0, b4),
        _mm256_permute2x128_si256::<0x20>(b1, b5),
        _mm256_permute2x128_si256::<0x20>(b2, b6),
        _mm256_permute2x128_si256::<0x20>(b3, b7),
        _mm256_permute2x128_si256::<0x31>(b0, b4),
        _mm256_permute2x128_si256::<0x31>(b1, b5),
        _mm256_permute2x128_si256::<0x31>(b2, b6),
        _mm256_permute2x128_si256::<0x31>(b3, b7),
    ]
}

/// The tile product for packing `P` (0 = [`Packing::I8`], 1 = U4, 2 = U5, 3 = U6)
/// with reduction `D`; inlined into each tier's `target_feature` entry point.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn rows<const P: u8, const D: u8>(
    w: &QMatrix,
    tile: usize,
    a: &[ActRow<'_>],
    out: &mut [[f32; TILE]],
) {
    let nb = w.blocks_per_row();
    let bpb = w.packing.bytes();
    let packed = w.qs.as_ptr().add(tile * nb * TILE * bpb);
    if P == 0 {
        row_groups::<D>(w, tile, packed, bpb, a, out);
    } else if a.len() >= EXPAND_ROWS {
        // Many rows: unpack the tile once, row-interleaved, and run the
        // interleaved kernel over it.
        let buf = expand::<P, false>(w, tile);
        const RM: usize = 4;
        let mut j = 0;
        while j + RM <= a.len() {
            let r =
                kernel_interleaved::<RM, P, D>(w, tile, buf, std::array::from_fn(|k| &a[j + k]));
            for (k, v) in r.iter().enumerate() {
                _mm256_storeu_ps(out[j + k].as_mut_ptr(), *v);
            }
            j += RM;
        }
        while j < a.len() {
            let r = kernel_interleaved::<1, P, D>(w, tile, buf, [&a[j]]);
            _mm256_storeu_ps(out[j].as_mut_ptr(), r[0]);
            j += 1;
        }
    } else {
        // Packed nibbles: two weight rows per 32-byte load.
        const RM: usize = NIBBLE_ROWS;
        let mut j = 0;
        while j + RM <= a.len() {
            let r = kernel_nibbles::<RM, P, D>(w, tile, packed, std::array::from_fn(|k| &a[j + k]));
            for (k, v) in r.iter().enumerate() {
                _mm256_storeu_ps(out[j + k].as_mut_ptr(), *v);
            }
            j += RM;
        }
        while j < a.len() {
            let r = kernel_nibbles::<1, P, D>(w, tile, packed, [&a[j]]);
            _mm256_storeu_ps(out[j].as_mut_ptr(), r[0]);
            j += 1;
        }
    }
}

/// Unpack tile `tile` of a 4-, 5- or 6-bit `w` (`P` 1–3) into this thread's
/// buffer, row-interleaved, and return it: per block, 32-byte word `g`
/// holds values `4g..4g+3` of the 8 rows, row `c` in 32-bit lane `c`. With
/// `PAIRS` (the 512-bit kernel's layout) words `2k` and `2k+1` are merged
/// into one 64-byte word whose 32-bit lanes `2c` and `2c+1` hold row `c`'s
/// values `8k..8k+3` and `8k+4..8k+7`. The buffer stays valid until the next
/// call on this thread.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn expand<const P: u8, const PAIRS: bool>(w: &QMatrix, tile: usize) -> *const u8 {
    let nb = w.blocks_per_row();
    let packed = w.qs.as_ptr().add(tile * nb * TILE * w.packing.bytes());
    // SAFETY: the buffer is this thread's, and nothing below re-enters this
    // function, so no other reference to it is live.
    let buf = &mut *EXPANDED.with(|b| b.get());
    buf.resize(nb * TILE * QK, 0);
    for b in 0..nb {
        let mut v = [_mm256_setzero_si256(); TILE];
        for (c, v) in v.iter_mut().enumerate() {
            *v = nibbles(packed.add((b * TILE + c) * 16));
            if P >= 2 {
                let h =
                    w.hi.as_ptr()
                        .add(w.hi_index(tile * TILE + c, b) + (c & 1) * 16);
                let h = _mm256_set_m128i(
                    _mm_loadu_si128(h.add(32) as *const __m128i),
                    _mm_loadu_si128(h as *const __m128i),
                );
                *v = _mm256_or_si256(*v, high_bits::<P>(h, b));
            }
        }
        let t = transpose_words(v);
        let at = buf.as_mut_ptr().add(b * TILE * QK);
        if PAIRS {
            for k in 0..TILE / 2 {
                // Lanes (row 0 word 2k, row 0 word 2k+1, row 1 …) in order.
                let lo = _mm256_unpacklo_epi32(t[2 * k], t[2 * k + 1]);
                let hi = _mm256_unpackhi_epi32(t[2 * k], t[2 * k + 1]);
                let p = at.add(k * 64) as *mut __m256i;
                _mm256_storeu_si256(p, _mm256_permute2x128_si256::<0x20>(lo, hi));
                _mm256_storeu_si256(p.add(1), _mm256_permute2x128_si256::<0x31>(lo, hi));
            }
        } else {
            for (g, t) in t.iter().enumerate() {
                _mm256_storeu_si256(at.add(g * QK) as *mut __m256i, *t);
            }
        }
    }
    buf.as_ptr()
}

/// How far ahead (bytes of the packed nibble stream) [`kernel_nibbles`]
/// prefetches its weights.
const PREFETCH: usize = 1024;

/// Activation rows per call of [`kernel_nibbles`].
const NIBBLE_ROWS: usize = 4;

/// Activation rows from which [`rows`] unpacks a tile once (row-interleaved,
/// for [`kernel_interleaved`]) instead of per row group.
pub(super) const EXPAND_ROWS: usize = 8;

thread_local! {
    static EXPANDED: std::cell::UnsafeCell<Vec<u8>> = const { std::cell::UnsafeCell::new(Vec::new()) };
}

/// [`kernel`] over groups of up to 4 activation rows (signed bytes).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_groups<const D: u8>(
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
        let r = kernel::<RM, D>(w, tile, qs, bpb, std::array::from_fn(|k| &a[j + k]));
        for (k, v) in r.iter().enumerate() {
            _mm256_storeu_ps(out[j + k].as_mut_ptr(), *v);
        }
        j += RM;
    }
    while j < a.len() {
        let r = kernel::<1, D>(w, tile, qs, bpb, [&a[j]]);
        _mm256_storeu_ps(out[j].as_mut_ptr(), r[0]);
        j += 1;
    }
}

/// The 32 values of one row's packed 16 nibble bytes at `p` (values 0–15 in the
/// low lane, 16–31 in the high lane).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let x = _mm_loadu_si128(p as *const __m128i);
    let m4 = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(x, m4);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(x), m4);
    _mm256_set_m128i(hi, lo)
}

/// Bit `k` of every byte of `h`, moved to bit 4 (`0x10` or 0). A 16-bit shift
/// never carries a byte's bit `k` into the other byte's bit 4 (|4 − k| ≤ 4).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn bit4(h: __m256i, k: usize) -> __m256i {
    let t = if k <= 4 {
        _mm256_sll_epi16(h, _mm_cvtsi32_si128((4 - k) as i32))
    } else {
        _mm256_srl_epi16(h, _mm_cvtsi32_si128((k - 4) as i32))
    };
    _mm256_and_si256(t, _mm256_set1_epi8(0x10))
}

/// Bits 4–5 of every byte of `h` for block `b` of its [`QMatrix::hi`] group,
/// in place (`0x30` masked): bits `2k`, `2k+1` shifted by `4 − 2k`. A 16-bit
/// shift by at most 4 never carries the other byte's bits into bits 4–5.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn bits45(h: __m256i, k: usize) -> __m256i {
    let t = match k {
        0 => _mm256_slli_epi16::<4>(h),
        1 => _mm256_slli_epi16::<2>(h),
        2 => h,
        _ => _mm256_srli_epi16::<2>(h),
    };
    _mm256_and_si256(t, _mm256_set1_epi8(0x30))
}

/// The high bits of block `b` for packing `P` (2 = U5, 3 = U6), in place.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn high_bits<const P: u8>(h: __m256i, b: usize) -> __m256i {
    if P == 3 {
        bits45(h, b % HI_GROUP6)
    } else {
        bit4(h, b % HI_GROUP)
    }
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

/// Where one tile's [`Scales`] start.
#[derive(Clone, Copy)]
pub(super) enum ScalePtr {
    F32(*const f32),
    F16(*const u16),
    Super(*const u8, *const u16),
}

impl ScalePtr {
    /// Scales and offsets (if any) of tile `tile` of `w`.
    pub(super) unsafe fn tile(w: &QMatrix, tile: usize) -> (Self, Option<Self>) {
        let nb = w.blocks_per_row();
        let (base, sbase) = (tile * nb * TILE, tile * (nb / SUPER) * TILE);
        let d = ScalePtr::new(&w.d, base, sbase);
        (d, w.m.as_ref().map(|m| ScalePtr::new(m, base, sbase)))
    }

    /// The tile whose blocks start at index `base` (super-blocks at `sbase`).
    unsafe fn new(s: &Scales, base: usize, sbase: usize) -> Self {
        match s {
            Scales::F32(v) => ScalePtr::F32(v.as_ptr().add(base)),
            Scales::F16(v) => ScalePtr::F16(v.as_ptr().add(base) as *const u16),
            Scales::Super { sc, sup } => {
                ScalePtr::Super(sc.as_ptr().add(base), sup.as_ptr().add(sbase) as *const u16)
            }
        }
    }

    /// The 8 rows' f32 values of block `b` (exactly [`Scales::get`]).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn load(self, b: usize) -> __m256 {
        match self {
            ScalePtr::F32(p) => _mm256_loadu_ps(p.add(b * TILE)),
            ScalePtr::F16(p) => _mm256_cvtph_ps(_mm_loadu_si128(p.add(b * TILE) as *const __m128i)),
            ScalePtr::Super(sc, sup) => {
                let k = _mm256_cvtepu8_epi32(_mm_loadl_epi64(sc.add(b * TILE) as *const __m128i));
                _mm256_mul_ps(
                    _mm256_cvtepi32_ps(k),
                    _mm256_cvtph_ps(_mm_loadu_si128(
                        sup.add((b / SUPER) * TILE) as *const __m128i
                    )),
                )
            }
        }
    }
}

/// The 6-bit sub-scale pairs of tile `tile` (`[block][row][2]` bytes), or
/// null for other packings.
#[inline(always)]
pub(super) unsafe fn sub_ptr<const P: u8>(w: &QMatrix, tile: usize) -> *const u8 {
    match (P, w.sub.as_ref()) {
        (3, Some(s)) => s.as_ptr().add(tile * w.blocks_per_row() * TILE) as *const u8,
        _ => std::ptr::null(),
    }
}

/// Block `b`'s 6-bit sub-scale pairs (from [`sub_ptr`]): row `c`'s first
/// and second sub-scale sign-extended to `i32` lane `c` of the two vectors.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn sub_lanes(sub: *const u8, b: usize) -> (__m256i, __m256i) {
    let s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(sub.add(b * TILE * 2) as *const __m128i));
    (
        _mm256_srai_epi32::<16>(_mm256_slli_epi32::<16>(s16)),
        _mm256_srai_epi32::<16>(s16),
    )
}

/// The offset term's per-row factor of block `b`: `m − zero·d` (the scalar
/// reference's `fma(−zero, d, m)`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn offset(m: Option<ScalePtr>, negz: __m256, dw: __m256, b: usize) -> __m256 {
    let mv = match m {
        Some(m) => m.load(b),
        None => _mm256_setzero_ps(),
    };
    _mm256_fmadd_ps(negz, dw, mv)
}

/// The float step of block `b` for one activation row, in the scalar
/// reference's order: `acc + isum·(d_w·d_a)`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block_step(acc: __m256, isum: __m256i, dw: __m256, a: &ActRow<'_>, b: usize) -> __m256 {
    let dd = _mm256_mul_ps(dw, _mm256_set1_ps(*a.d.get_unchecked(b)));
    _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), dd, acc)
}

/// The offset term's step of block `b` for one activation row:
/// `macc + off·(d_a·Σa)`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn offset_step(macc: __m256, off: __m256, a: &ActRow<'_>, b: usize) -> __m256 {
    _mm256_fmadd_ps(off, _mm256_set1_ps(*a.s.get_unchecked(b)), macc)
}

/// [`kernel`] for packed 4-, 5- and 6-bit values (`P` 1 = [`Packing::U4`],
/// 2 = [`Packing::U5`], 3 = [`Packing::U6`]): the 16-byte nibble blocks of
/// weight rows `2k` and `2k+1` are adjacent, so one 32-byte load holds both;
/// its low nibbles (values 0–15 of the two rows) multiply the activations'
/// first half duplicated to both lanes, its high nibbles the second half. For
/// 5- and 6-bit values the two 32-byte loads of [`QMatrix::hi`] for the pair
/// hold the high bits of the same values (one shift per block selects the
/// block's bits).
/// `madd` leaves four partial sums per row (row `2k` low lane, `2k+1` high),
/// and three `hadd`s and a permute fold the 8 rows; every partial is an exact
/// integer, so the block sums equal [`kernel`]'s.
/// 6-bit values are multiplied unsigned (`u = q + 32`, no sign juggling),
/// each half weighted by its sub-scale through `madd`; the zero comes off as
/// `32 · (sub₀·Σ₀..₁₅ a + sub₁·Σ₁₆..₃₁ a)` from the activations' half sums,
/// in integers, so the block sum is the scalar reference's exactly.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn kernel_nibbles<const R: usize, const P: u8, const D: u8>(
    w: &QMatrix,
    tile: usize,
    qs: *const u8,
    a: [&ActRow<'_>; R],
) -> [__m256; R] {
    let nb = w.blocks_per_row();
    let (d, m) = ScalePtr::tile(w, tile);
    let negz = _mm256_set1_ps(-(w.zero as f32));
    let m4 = _mm256_set1_epi8(0x0F);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let hip = if P >= 2 {
        w.hi.as_ptr().add(w.hi_index(tile * TILE, 0))
    } else {
        std::ptr::null()
    };
    let group = if P == 3 { HI_GROUP6 } else { HI_GROUP };
    let sub = sub_ptr::<P>(w, tile);
    let lo16 = _mm256_setr_epi8(
        0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, //
        0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
    );
    let hi16 = _mm256_add_epi8(lo16, _mm256_set1_epi8(2));
    let mut acc = [_mm256_setzero_ps(); R];
    let mut macc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let mut alo = [_mm256_setzero_si256(); R];
        let mut ahi = [_mm256_setzero_si256(); R];
        for r in 0..R {
            let p = a[r].qs.as_ptr().add(b * QK) as *const __m128i;
            alo[r] = _mm256_broadcastsi128_si256(_mm_loadu_si128(p));
            ahi[r] = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.add(1)));
        }
        let wb = qs.add(b * TILE * 16);
        let hb = if P >= 2 {
            hip.add((b / group) * (TILE / 2) * HI_PAIR_BYTES)
        } else {
            hip
        };
        // Ask for the weight streams PREFETCH bytes ahead (past the tile's end
        // they run into the next tile, which this thread takes next): the
        // hardware prefetchers alone leave the loads stalling on memory.
        if PREFETCH > 0 {
            _mm_prefetch::<_MM_HINT_T0>(wb.wrapping_add(PREFETCH) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(wb.wrapping_add(PREFETCH + 64) as *const i8);
        }
        if P >= 2 && PREFETCH > 0 {
            let h = hip.wrapping_add(b * (TILE / 2) * HI_PAIR_BYTES / group + PREFETCH / 2);
            _mm_prefetch::<_MM_HINT_T0>(h as *const i8);
        }
        // 6-bit: the 8 rows' sub-scale pairs as 16 i16s (row c's pair in
        // 32-bit lane c).
        let subv = if P == 3 {
            _mm256_cvtepi8_epi16(_mm_loadu_si128(sub.add(b * TILE * 2) as *const __m128i))
        } else {
            _mm256_setzero_si256()
        };
        // Pairs of pairs are folded as soon as both exist (fewer live registers).
        let mut prev = [_mm256_setzero_si256(); R];
        let mut pr = [[_mm256_setzero_si256(); 2]; R];
        for (k, _) in [(); 4].iter().enumerate() {
            let x = _mm256_loadu_si256(wb.add(32 * k) as *const __m256i);
            let mut lo = _mm256_and_si256(x, m4);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(x), m4);
            if P >= 2 {
                let h = hb.add(k * HI_PAIR_BYTES);
                lo = _mm256_or_si256(
                    lo,
                    high_bits::<P>(_mm256_loadu_si256(h as *const __m256i), b),
                );
                hi = _mm256_or_si256(
                    hi,
                    high_bits::<P>(_mm256_loadu_si256(h.add(32) as *const __m256i), b),
                );
            }
            // 6-bit: rows 2k (low lane) and 2k+1 (high lane): their first
            // sub-scale for the low nibbles' values, the second for the high.
            let (s0, s1) = if P == 3 {
                let idx = _mm256_setr_epi32(
                    2 * k as i32,
                    2 * k as i32,
                    2 * k as i32,
                    2 * k as i32,
                    2 * k as i32 + 1,
                    2 * k as i32 + 1,
                    2 * k as i32 + 1,
                    2 * k as i32 + 1,
                );
                let pair = _mm256_permutevar8x32_epi32(subv, idx);
                (
                    _mm256_shuffle_epi8(pair, lo16),
                    _mm256_shuffle_epi8(pair, hi16),
                )
            } else {
                (_mm256_setzero_si256(), _mm256_setzero_si256())
            };
            for r in 0..R {
                let v = if P == 3 {
                    // ≤ 2·63·127 per maddubs lane: fits i16.
                    _mm256_add_epi32(
                        _mm256_madd_epi16(_mm256_maddubs_epi16(lo, alo[r]), s0),
                        _mm256_madd_epi16(_mm256_maddubs_epi16(hi, ahi[r]), s1),
                    )
                } else {
                    // ≤ 2·31·127 per maddubs lane, twice: fits i16.
                    dot2::<D>(lo, alo[r], hi, ahi[r])
                };
                if k % 2 == 0 {
                    prev[r] = v;
                } else {
                    pr[r][k / 2] = _mm256_hadd_epi32(prev[r], v);
                }
            }
        }
        let dw = d.load(b);
        let off = if P == 3 {
            None
        } else {
            Some(offset(m, negz, dw, b))
        };
        for r in 0..R {
            let h = _mm256_hadd_epi32(pr[r][0], pr[r][1]);
            let mut isum = _mm256_permutevar8x32_epi32(h, order);
            if P == 3 {
                // − 32 · (sub₀·A₀ + sub₁·A₁) per row, A the activation half sums.
                let [a0, a1] = *a[r].h.get_unchecked(b);
                let apair = _mm256_set1_epi32((a0 as u16 as i32) | ((a1 as i32) << 16));
                let zero = _mm256_madd_epi16(subv, apair);
                isum = _mm256_sub_epi32(isum, _mm256_slli_epi32::<5>(zero));
            }
            acc[r] = block_step(acc[r], isum, dw, a[r], b);
            if let Some(off) = off {
                macc[r] = offset_step(macc[r], off, a[r], b);
            }
        }
    }
    for r in 0..R {
        acc[r] = _mm256_add_ps(acc[r], macc[r]);
    }
    acc
}

/// The tile product over an unpacked, row-interleaved tile (`P` 1–3, unsigned
/// values `u`): per block, 32-byte word `g` holds values `4g..4g+3` of the 8
/// rows, row `c` in 32-bit lane `c`, so one `vpdpbusd` (or `maddubs` +
/// `madd`) with the activations' word `g` broadcast adds each row's 4
/// products to its own lane: no horizontal fold per block. The two 16-value
/// halves accumulate apart, for the 6-bit format's sub-scales and zero
/// (`Σ_h sub_h·(Σ_h u·a − 32·A_h)`, A the activation half sums); 4- and 5-bit
/// values take the offset term as in [`kernel`]. Every lane holds the exact
/// block sum, so the result is [`super::scalar`]'s bit for bit.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn kernel_interleaved<const R: usize, const P: u8, const D: u8>(
    w: &QMatrix,
    tile: usize,
    buf: *const u8,
    a: [&ActRow<'_>; R],
) -> [__m256; R] {
    let nb = w.blocks_per_row();
    let (d, m) = ScalePtr::tile(w, tile);
    let negz = _mm256_set1_ps(-(w.zero as f32));
    let sub = sub_ptr::<P>(w, tile);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut macc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let wb = buf.add(b * TILE * QK);
        let mut h0 = [_mm256_setzero_si256(); R];
        let mut h1 = [_mm256_setzero_si256(); R];
        for g in 0..QK / 4 {
            let wv = _mm256_loadu_si256(wb.add(g * 32) as *const __m256i);
            for r in 0..R {
                let word = (a[r].qs.as_ptr().add(b * QK + 4 * g) as *const i32).read_unaligned();
                let av = _mm256_set1_epi32(word);
                if g < 4 {
                    h0[r] = dot_acc::<D>(h0[r], wv, av);
                } else {
                    h1[r] = dot_acc::<D>(h1[r], wv, av);
                }
            }
        }
        let dw = d.load(b);
        let (sub0, sub1) = if P == 3 {
            sub_lanes(sub, b)
        } else {
            (_mm256_setzero_si256(), _mm256_setzero_si256())
        };
        let off = if P == 3 {
            None
        } else {
            Some(offset(m, negz, dw, b))
        };
        for r in 0..R {
            let isum = if P == 3 {
                let [a0, a1] = *a[r].h.get_unchecked(b);
                let z0 = _mm256_sub_epi32(h0[r], _mm256_set1_epi32(32 * a0 as i32));
                let z1 = _mm256_sub_epi32(h1[r], _mm256_set1_epi32(32 * a1 as i32));
                _mm256_add_epi32(_mm256_mullo_epi32(z0, sub0), _mm256_mullo_epi32(z1, sub1))
            } else {
                _mm256_add_epi32(h0[r], h1[r])
            };
            acc[r] = block_step(acc[r], isum, dw, a[r], b);
            if let Some(off) = off {
                macc[r] = offset_step(macc[r], off, a[r], b);
            }
        }
    }
    for r in 0..R {
        acc[r] = _mm256_add_ps(acc[r], macc[r]);
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn kernel<const R: usize, const D: u8>(
    w: &QMatrix,
    tile: usize,
    qs: *const u8,
    bpb: usize,
    a: [&ActRow<'_>; R],
) -> [__m256; R] {
    let nb = w.blocks_per_row();
    let base = tile * nb * TILE;
    let (d, _) = ScalePtr::tile(w, tile);
    let sub = w.sub.as_ref().map(|s| s.as_ptr().add(base));
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let mut av = [_mm256_setzero_si256(); R];
        for r in 0..R {
            av[r] = _mm256_loadu_si256(a[r].qs.as_ptr().add(b * QK) as *const __m256i);
        }
        let wb = qs.add(b * TILE * bpb);
        // Q6_K: the 8 rows' sub-scale pairs of this block as 16 i16s
        // (row c's pair in 32-bit lane c), loaded once per block.
        let subv = match sub {
            Some(s) => _mm256_cvtepi8_epi16(_mm_loadu_si128(s.add(b * TILE) as *const __m128i)),
            None => _mm256_setzero_si256(),
        };
        // Column pairs are folded as soon as they are computed (hadd), which
        // keeps the live registers at about 4·R.
        let mut h = [[_mm256_setzero_si256(); 4]; R];
        for pair in 0..TILE / 2 {
            let mut v = [[_mm256_setzero_si256(); 2]; R];
            for k in 0..2 {
                let c = 2 * pair + k;
                let wv = _mm256_loadu_si256(wb.add(c * bpb) as *const __m256i);
                // |w| times the activations with w's sign.
                let uw = _mm256_sign_epi8(wv, wv);
                match sub {
                    // Q6_K: the two 16-value halves' sub-scales weight the
                    // `maddubs` pairs (low lane: values 0–15): row c's pair
                    // broadcast, then its first i16 spread over the low
                    // lane and its second over the high lane.
                    Some(_) => {
                        let pair = _mm256_permutevar8x32_epi32(subv, _mm256_set1_epi32(c as i32));
                        let scale = _mm256_shuffle_epi8(
                            pair,
                            _mm256_setr_epi8(
                                0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, //
                                2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3,
                            ),
                        );
                        for r in 0..R {
                            let sa = _mm256_sign_epi8(av[r], wv);
                            v[r][k] = _mm256_madd_epi16(_mm256_maddubs_epi16(uw, sa), scale);
                        }
                    }
                    None => {
                        for r in 0..R {
                            v[r][k] = dot::<D>(uw, _mm256_sign_epi8(av[r], wv));
                        }
                    }
                }
            }
            for r in 0..R {
                h[r][pair] = _mm256_hadd_epi32(v[r][0], v[r][1]);
            }
        }
        let dw = d.load(b);
        for r in 0..R {
            // Signed bytes have no offset term.
            acc[r] = block_step(acc[r], fold_pairs(h[r]), dw, a[r], b);
        }
    }
    acc
}

/// [`super::blocks::quantize_block`] on 8-lane vectors, bit for bit: the same
/// `amax`, `d = amax/127`, `v·(1/d)`, rounding half away from zero (truncate,
/// then step away from zero when the exact remainder is at least ½), clamp to
/// ±127, NaN to 0, and integer half sums. Caller guarantees [`available`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, [i16; 2]) {
    assert!(x.len() >= QK && q.len() >= QK);
    let p = x.as_ptr();
    let mut v = [_mm256_setzero_ps(); 4];
    for (k, v) in v.iter_mut().enumerate() {
        *v = _mm256_loadu_ps(p.add(8 * k));
    }
    let absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    // `max(|v|, acc)` keeps `acc` when `|v|` is NaN, as `f32::max` does.
    let mut m = _mm256_setzero_ps();
    for v in v {
        m = _mm256_max_ps(_mm256_and_ps(v, absmask), m);
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let m1 = _mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2));
    let amax = _mm_cvtss_f32(m1);
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    let signmask = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
    let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let mut i = [_mm256_setzero_si256(); 4];
    for (i, &v) in i.iter_mut().zip(&v) {
        let y = _mm256_mul_ps(v, id);
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
        let rem = _mm256_and_ps(_mm256_sub_ps(y, t), absmask);
        let away = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(rem, half), one);
        let r = _mm256_add_ps(t, _mm256_or_ps(away, _mm256_and_ps(y, signmask)));
        let r = _mm256_min_ps(hi, _mm256_max_ps(lo, r));
        let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(r, r));
        *i = _mm256_cvttps_epi32(r);
    }
    let packed = _mm256_packs_epi16(
        _mm256_packs_epi32(i[0], i[1]),
        _mm256_packs_epi32(i[2], i[3]),
    );
    let packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, packed);
    (
        d,
        [
            hsum_epi32(_mm256_add_epi32(i[0], i[1])) as i16,
            hsum_epi32(_mm256_add_epi32(i[2], i[3])) as i16,
        ],
    )
}

/// The sum of the 8 `i32` lanes of `a` (wrapping).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn hsum_epi32(a: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256::<1>(a));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}
