//! AVX-VNNI tier (Alder Lake and later client cores, Sapphire Rapids, Zen 5):
//! the AVX2 tier's tiles and block layout, with one VEX-encoded `vpdpbusd`
//! in place of each `maddubs` + `madd` pair. Same exact integer lanes, so
//! bit-identical to [`super::scalar`].

use super::avx2;
use super::blocks::{ActRow, Packing, QMatrix, TILE};

/// Whether this CPU can run the tier.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2::available() && is_x86_feature_detected!("avxvnni")
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
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn rows<const P: u8>(w: &QMatrix, tile: usize, a: &[ActRow<'_>], out: &mut [[f32; TILE]]) {
    avx2::rows::<P, { avx2::DPBUSD_VEX }>(w, tile, a, out)
}
