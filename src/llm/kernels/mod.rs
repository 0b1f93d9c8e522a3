//! CPU matmul kernels on int8 blocks: weights stay in (a lossless repacking
//! of) their GGUF block format, activations are quantized to int8
//! blocks once per matmul, and every weight row is read once per call for the
//! whole batch. One file per instruction-set tier with the scalar reference
//! beside them and one dispatch table ([`Tier`]), like ggml-cpu's `arch/` split.
//!
//! Exactness: inside a block the arithmetic is integer, and the float steps
//! (one FMA per lane and block, a fixed horizontal sum) are the same on every
//! tier, so a row's result is bit-identical for every batch size, batch
//! partner, thread count and tier. `CANTANTE_KERNEL=scalar|avx2|avxvnni|avx512vnni`
//! forces a tier (tests run every tier the machine has).

pub mod avx2;
pub mod avx512vnni;
pub mod avxvnni;
pub mod blocks;
pub mod scalar;

pub use blocks::{ActRow, Block, Packing, QActs, QMatrix, ScaleKind, Scales, QK, SUPER, TILE};

use crate::llm::team::{self, SharedMut};
use std::sync::OnceLock;

/// An instruction-set tier of the int8 kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Portable scalar reference.
    Scalar,
    /// AVX2 + FMA (x86-64).
    Avx2,
    /// AVX2 tiles with AVX-VNNI dot products (`vpdpbusd`, VEX).
    AvxVnni,
    /// AVX2 tiles with AVX-512 VNNI dot products (`vpdpbusd`, EVEX, 256-bit).
    Avx512Vnni,
}

impl Tier {
    /// Tiers this CPU can run, best last.
    pub fn available() -> Vec<Tier> {
        Tier::ALL.into_iter().filter(|t| t.supported()).collect()
    }

    /// Every tier, best last (whether or not this CPU has it).
    pub const ALL: [Tier; 4] = [Tier::Scalar, Tier::Avx2, Tier::AvxVnni, Tier::Avx512Vnni];

    /// Whether the tier's code needs AVX2 (so AVX2 f32 code may run beside it).
    pub fn has_avx2(self) -> bool {
        self != Tier::Scalar
    }

    /// The tier in use: `CANTANTE_KERNEL` when set (and available), else the best.
    pub fn active() -> Tier {
        static ACTIVE: OnceLock<Tier> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let avail = Tier::available();
            let best = *avail.last().unwrap_or(&Tier::Scalar);
            match std::env::var("CANTANTE_KERNEL").ok().as_deref() {
                None | Some("") | Some("auto") => best,
                Some(name) => match Tier::ALL.iter().find(|t| t.name() == name) {
                    Some(t) if avail.contains(t) => *t,
                    _ => {
                        tracing::warn!(
                            "CANTANTE_KERNEL={name} is not available here (available: {}); using {}",
                            avail.iter().map(|t| t.name()).collect::<Vec<_>>().join(", "),
                            best.name()
                        );
                        best
                    }
                },
            }
        })
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Scalar => "scalar",
            Tier::Avx2 => "avx2",
            Tier::AvxVnni => "avxvnni",
            Tier::Avx512Vnni => "avx512vnni",
        }
    }

    /// Whether this CPU can run the tier (feature detection is cached by std).
    pub fn supported(self) -> bool {
        match self {
            Tier::Scalar => true,
            Tier::Avx2 => avx2::available(),
            Tier::AvxVnni => avxvnni::available(),
            Tier::Avx512Vnni => avx512vnni::available(),
        }
    }

    /// `out[j][c] = w[tile·TILE + c] · a[j]` for one tile of weight rows.
    ///
    /// # Panics
    /// If this CPU cannot run the tier.
    pub fn tile_rows(self, w: &QMatrix, tile: usize, a: &[ActRow<'_>], out: &mut [[f32; TILE]]) {
        assert!(
            self.supported(),
            "kernel tier {} is not available on this CPU",
            self.name()
        );
        match self {
            Tier::Scalar => scalar::tile_rows(w, tile, a, out),
            // SAFETY (all three): asserted above that the CPU has the tier's features.
            #[cfg(target_arch = "x86_64")]
            Tier::Avx2 => unsafe { avx2::tile_rows(w, tile, a, out) },
            #[cfg(target_arch = "x86_64")]
            Tier::AvxVnni => unsafe { avxvnni::tile_rows(w, tile, a, out) },
            #[cfg(target_arch = "x86_64")]
            Tier::Avx512Vnni => unsafe { avx512vnni::tile_rows(w, tile, a, out) },
            #[cfg(not(target_arch = "x86_64"))]
            Tier::Avx2 | Tier::AvxVnni | Tier::Avx512Vnni => scalar::tile_rows(w, tile, a, out),
        }
    }
}

/// Activation rows processed per pass over the weights (keeps them in L2).
const ROW_TILE: usize = 64;
/// Below this many multiply-adds a matmul runs on the calling thread.
const PARALLEL_MACS: usize = 1 << 17;

/// `out[r·ldo + c] = (acts · wᵀ)[r, c]` for `c < w.rows`, threads splitting the
/// output columns (`ldo ≥ w.rows` lets several matrices fill one wide output).
pub fn matmul(tier: Tier, w: &QMatrix, acts: &QActs, out: &mut [f32], ldo: usize) {
    assert_eq!(w.cols, acts.cols, "matmul: inner dimensions differ");
    let (t, n) = (acts.rows, w.rows);
    assert!(ldo >= n && (t == 0 || out.len() >= (t - 1) * ldo + n));
    let tiles = w.tiles();
    let out = SharedMut::new(out);
    let min_tiles = (PARALLEL_MACS / (t * TILE * w.cols).max(1)).max(1);
    team::for_ranges(tiles, min_tiles, &|range| {
        let mut buf = [[0f32; TILE]; ROW_TILE];
        let mut r0 = 0;
        while r0 < t {
            let r1 = (r0 + ROW_TILE).min(t);
            let rows: Vec<ActRow<'_>> = (r0..r1).map(|r| acts.row(r)).collect();
            for tile in range.clone() {
                tier.tile_rows(w, tile, &rows, &mut buf[..r1 - r0]);
                let c0 = tile * TILE;
                let width = TILE.min(n - c0);
                for (i, v) in buf[..r1 - r0].iter().enumerate() {
                    let at = (r0 + i) * ldo + c0;
                    // SAFETY: row r0+i, columns c0..c0+width belong to this
                    // range's tiles only.
                    unsafe { out.range(at, at + width) }.copy_from_slice(&v[..width]);
                }
            }
            r0 = r1;
        }
    });
}
