//! Weight and activation block formats of the int8 kernels, and the lossless
//! conversion of GGUF block formats into them.
//!
//! Every weight matrix is rows of 32-element blocks with one scale `d`, an
//! optional offset `m` (the "min" of Q4_1/Q5_1/Q4_K/Q5_K) and optional
//! integer sub-scales per 16 values (Q6_K); a weight value is `(d · sub) · q + m`,
//! exactly the value the GGUF file stores: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
//! Q5_K and Q6_K convert without loss (checked in the tests against candle's
//! dequantization); other types (F32, F16, …) are quantized to Q8_0-style blocks.
//!
//! Values keep their bit width ([`Packing`]): 8-bit as `i8`, 4-bit as nibbles,
//! 5-bit as nibbles plus a bit plane, 6-bit (Q6_K) as nibbles plus 2-bit
//! fields that hold the high bits of 4 blocks per byte (llama.cpp's `qh`
//! idea: one load and one shift per 32 values; two separate bit planes had
//! cost more to unpack than they saved in bytes), and scales keep their storage ([`Scales`]): f16 where the file has an f16 per
//! block, and for Q4_K/Q5_K the 6-bit integer per block with one f32 per
//! 256-value super-block (their product is exact in f32), so a decode step
//! streams about the GGUF's bytes (Q4_K: 19 bytes per 32 values, the file 18). 4- and 5-bit values are stored
//! unsigned (`u = q + zero`) and the kernels multiply them unsigned; the signed
//! offset of Q4_0/Q5_0 becomes `−zero · d` in the offset term.
//!
//! Activations are quantized once per matmul to the same 32-blocks ([`QActs`]);
//! the dot product runs in integers inside a block with one float step per block
//! (see [`super::scalar`]).
//!
//! Layout: rows are grouped in tiles of [`TILE`] output features; within a tile,
//! block `b` of its 8 rows is contiguous (`[tile][block][row][bytes]` for the
//! values, `[tile][block][row]` for scales, offsets and sub-scales), so a kernel
//! reads one run per block and produces 8 outputs at once. The last tile is
//! padded with zero rows.

use super::Tier;
use crate::llm::team::{self, SharedMut};
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

/// Elements per block.
pub const QK: usize = 32;

/// Output features per tile.
pub const TILE: usize = 8;

/// How a matrix stores its values (bytes per 32-block and row in parentheses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// Signed 8-bit values (32): Q8_0 and requantized f32/f16.
    I8,
    /// Unsigned 4-bit values (16): byte `j` holds values `j` (low nibble) and `j+16`.
    U4,
    /// Unsigned 5-bit values (16 + 4): nibbles as [`Packing::U4`] in
    /// [`QMatrix::qs`], bit 4 in [`QMatrix::hi`].
    U5,
    /// Unsigned 6-bit values (16 + 8), Q6_K's `u = q + 32` with its integer
    /// sub-scales: nibbles as [`Packing::U4`] in [`QMatrix::qs`], bits 4–5 in
    /// [`QMatrix::hi`] (2 bits per block, [`HI_GROUP6`] blocks per byte).
    U6,
}

impl Packing {
    /// Bytes per block and row in [`QMatrix::qs`].
    pub fn bytes(self) -> usize {
        match self {
            Packing::I8 => 32,
            Packing::U4 => 16,
            Packing::U5 | Packing::U6 => 16,
        }
    }

    /// Blocks whose high bits share the bytes of one [`QMatrix::hi`] group
    /// (1 for packings without high bits).
    pub fn hi_group(self) -> usize {
        match self {
            Packing::U5 => HI_GROUP,
            Packing::U6 => HI_GROUP6,
            Packing::I8 | Packing::U4 => 1,
        }
    }

    /// High bits per value in [`QMatrix::hi`] (0, 1 or 2).
    pub fn hi_bits(self) -> usize {
        match self {
            Packing::U5 => 1,
            Packing::U6 => 2,
            Packing::I8 | Packing::U4 => 0,
        }
    }
}

/// The slices end to end.
fn cat<'a, T: Copy + 'a>(parts: impl Iterator<Item = &'a [T]>) -> Vec<T> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

/// Blocks per super-block of the K formats (256 values).
pub const SUPER: usize = 8;

/// How a matrix stores one f32 per block (its scales, or its offsets). Every
/// variant gives back exactly the f32 the file defines.
#[derive(Debug, Clone, PartialEq)]
pub enum Scales {
    /// One f32 per block, `[tile][block][row in tile]` (requantized weights).
    F32(Vec<f32>),
    /// One f16 per block, same layout (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q6_K).
    F16(Vec<f16>),
    /// `sup · sc`: an integer per block (same layout) times an f16 per
    /// super-block of [`SUPER`] blocks (`[tile][super-block][row in tile]`):
    /// Q4_K/Q5_K's f16 super-block scale (or negated min, also an f16) and
    /// 6-bit sub-scale. Kept in f16 as in the file: 4 bytes less per 256
    /// weights and scale kind than f32, for the memory-bound batch-1 decode.
    Super {
        /// Integer per block.
        sc: Vec<u8>,
        /// Factor per super-block.
        sup: Vec<f16>,
    },
}

/// Which [`Scales`] variant a matrix uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleKind {
    /// [`Scales::F32`].
    F32,
    /// [`Scales::F16`].
    F16,
    /// [`Scales::Super`].
    Super,
}

impl Scales {
    fn zeros(kind: ScaleKind, blocks: usize) -> Self {
        match kind {
            ScaleKind::F32 => Scales::F32(vec![0.0; blocks]),
            ScaleKind::F16 => Scales::F16(vec![f16::ZERO; blocks]),
            ScaleKind::Super => Scales::Super {
                sc: vec![0; blocks],
                sup: vec![f16::ZERO; blocks.div_ceil(SUPER)],
            },
        }
    }

    /// The variant.
    pub fn kind(&self) -> ScaleKind {
        match self {
            Scales::F32(_) => ScaleKind::F32,
            Scales::F16(_) => ScaleKind::F16,
            Scales::Super { .. } => ScaleKind::Super,
        }
    }

    /// The value at block index `i` (super-block index `s` for [`Scales::Super`]).
    #[inline]
    pub fn get(&self, i: usize, s: usize) -> f32 {
        match self {
            Scales::F32(v) => v[i],
            Scales::F16(v) => v[i].to_f32(),
            Scales::Super { sc, sup } => sc[i] as f32 * sup[s].to_f32(),
        }
    }

    /// Decomposition `(sup, sc)` at `(i, s)` ([`Scales::Super`] only).
    fn parts(&self, i: usize, s: usize) -> Option<(f32, u8)> {
        match self {
            Scales::Super { sc, sup } => Some((sup[s].to_f32(), sc[i])),
            _ => None,
        }
    }

    fn set(&mut self, i: usize, s: usize, v: f32, parts: Option<(f32, u8)>) {
        match self {
            Scales::F32(d) => d[i] = v,
            Scales::F16(d) => {
                let h = f16::from_f32(v);
                assert!(
                    h.to_f32() == v || v.is_nan(),
                    "scale {v} is not an f16 value"
                );
                d[i] = h;
            }
            Scales::Super { sc, sup } => {
                let (f, k) = parts.expect("a super-block scale needs its (factor, integer) parts");
                debug_assert_eq!(k as f32 * f, v);
                let h = f16::from_f32(f);
                assert!(
                    h.to_f32() == f || f.is_nan(),
                    "super-block factor {f} is not an f16 value"
                );
                sc[i] = k;
                sup[s] = h;
            }
        }
    }

    /// The parts end to end (all of one variant, whole tiles each).
    fn concat<'a>(parts: impl Iterator<Item = &'a Scales>) -> Scales {
        let parts: Vec<&Scales> = parts.collect();
        let mixed = || -> ! { unreachable!("concat checks the scale kinds") };
        match parts[0] {
            Scales::F32(_) => Scales::F32(cat(parts.iter().map(|p| match p {
                Scales::F32(v) => v.as_slice(),
                _ => mixed(),
            }))),
            Scales::F16(_) => Scales::F16(cat(parts.iter().map(|p| match p {
                Scales::F16(v) => v.as_slice(),
                _ => mixed(),
            }))),
            Scales::Super { .. } => {
                let (sc, sup) = parts
                    .iter()
                    .map(|p| match p {
                        Scales::Super { sc, sup } => (sc.as_slice(), sup.as_slice()),
                        _ => mixed(),
                    })
                    .unzip::<_, _, Vec<_>, Vec<_>>();
                Scales::Super {
                    sc: cat(sc.into_iter()),
                    sup: cat(sup.into_iter()),
                }
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Scales::F32(v) => 4 * v.len(),
            Scales::F16(v) => 2 * v.len(),
            Scales::Super { sc, sup } => sc.len() + 2 * sup.len(),
        }
    }
}

/// A weight matrix `(rows, cols)` (output features × input features) in
/// blocks of [`QK`] along `cols`, tiled by [`TILE`] rows.
#[derive(Debug, Clone, PartialEq)]
pub struct QMatrix {
    /// Output features.
    pub rows: usize,
    /// Input features (a multiple of [`QK`]).
    pub cols: usize,
    /// How values are stored.
    pub packing: Packing,
    /// For [`Packing::U4`]/[`Packing::U5`]/[`Packing::U6`]: stored `u = q +
    /// zero` (8 for Q4_0, 16 for Q5_0, 32 for Q6_K, 0 for formats with a min).
    pub zero: i8,
    /// Values (4-bit: nibbles), `[tile][block][row in tile][packing.bytes()]`.
    pub qs: Vec<u8>,
    /// Scales, `[tile][block][row in tile]`.
    pub d: Scales,
    /// Offsets (formats with a min), stored like `d`, else `None`.
    pub m: Option<Scales>,
    /// Sub-scales per 16 values (Q6_K), `[tile][block][row in tile]`, else `None`.
    pub sub: Option<Vec<[i8; 2]>>,
    /// Bit 4 of [`Packing::U5`] values, bits 4–5 of [`Packing::U6`] values
    /// (else empty), laid out for the kernels: `[tile][group of
    /// hi_group() blocks][row pair][2][2][16]`. For rows `2p`, `2p+1` of a
    /// tile and a group, 64 bytes: values 0–15 of row `2p`, of row `2p+1`,
    /// then values 16–31 of each; bit `k` (U5) or bits `2k`, `2k+1` (U6) of
    /// byte `j` belong to block `k` of the group. So one 32-byte load holds
    /// what a pair of rows' packed nibbles needs, and one shift moves block
    /// `k`'s bits into place.
    pub hi: Vec<u8>,
}

/// One block of one row, as the file defines it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Block {
    /// Values.
    pub q: [i8; QK],
    /// Scale.
    pub d: f32,
    /// Offset (0 when the format has none).
    pub m: f32,
    /// Sub-scales of the two 16-value halves (1 when the format has none).
    pub sub: [i8; 2],
    /// `(factor, integer)` with `d = integer · factor`, for [`Scales::Super`].
    pub d_parts: Option<(f32, u8)>,
    /// `(factor, integer)` with `m = integer · factor`, for [`Scales::Super`].
    pub m_parts: Option<(f32, u8)>,
}

impl Default for Block {
    fn default() -> Self {
        Self {
            q: [0; QK],
            d: 0.0,
            m: 0.0,
            sub: [1, 1],
            d_parts: None,
            m_parts: None,
        }
    }
}

/// Blocks whose bit 4 shares the bytes of one [`QMatrix::hi`] group.
pub const HI_GROUP: usize = 8;

/// Blocks whose bits 4–5 share the bytes of one [`QMatrix::hi`] group ([`Packing::U6`]).
pub const HI_GROUP6: usize = 4;

/// Bytes of one [`QMatrix::hi`] group for a pair of rows.
pub const HI_PAIR_BYTES: usize = 64;

impl QMatrix {
    /// A zero matrix with room for `rows × cols` (rows padded to whole tiles),
    /// scales stored as `d`, offsets (when the format has a min) as `m`, with
    /// sub-scales per 16 values when `sub`.
    pub fn zeros(
        rows: usize,
        cols: usize,
        packing: Packing,
        zero: i8,
        d: ScaleKind,
        m: Option<ScaleKind>,
        sub: bool,
    ) -> Self {
        assert_eq!(
            cols % QK,
            0,
            "{cols} input features are not a multiple of {QK}"
        );
        let uses_super = d == ScaleKind::Super || m == Some(ScaleKind::Super);
        assert!(
            !uses_super || (cols / QK) % SUPER == 0,
            "{cols} input features are not whole super-blocks"
        );
        let blocks = rows.div_ceil(TILE) * TILE * (cols / QK);
        let hi = match packing.hi_bits() {
            0 => 0,
            _ => {
                rows.div_ceil(TILE) * (cols / QK).div_ceil(packing.hi_group()) * TILE / 2
                    * HI_PAIR_BYTES
            }
        };
        Self {
            rows,
            cols,
            packing,
            zero,
            qs: vec![0; blocks * packing.bytes()],
            hi: vec![0; hi],
            d: Scales::zeros(d, blocks),
            m: m.map(|k| Scales::zeros(k, blocks)),
            sub: sub.then(|| vec![[1, 1]; blocks]),
        }
    }

    /// Blocks per row.
    pub fn blocks_per_row(&self) -> usize {
        self.cols / QK
    }

    /// Number of tiles.
    pub fn tiles(&self) -> usize {
        self.rows.div_ceil(TILE)
    }

    /// Index of block `b` of row `r` in `d`/`m`/`sub` (times `packing.bytes()` in `qs`).
    #[inline]
    pub fn index(&self, r: usize, b: usize) -> usize {
        ((r / TILE) * self.blocks_per_row() + b) * TILE + r % TILE
    }

    /// Index of the super-block holding block `b` of row `r` (for [`Scales::Super`]).
    #[inline]
    pub fn super_index(&self, r: usize, b: usize) -> usize {
        ((r / TILE) * (self.blocks_per_row() / SUPER) + b / SUPER) * TILE + r % TILE
    }

    /// Scale of block `b` of row `r`.
    #[inline]
    pub fn scale(&self, r: usize, b: usize) -> f32 {
        self.d.get(self.index(r, b), self.super_index(r, b))
    }

    /// Offset of block `b` of row `r` as the kernels use it: `m − zero · d`.
    #[inline]
    pub fn offset(&self, r: usize, b: usize) -> f32 {
        let (i, s) = (self.index(r, b), self.super_index(r, b));
        let m = self.m.as_ref().map_or(0.0, |m| m.get(i, s));
        (-(self.zero as f32)).mul_add(self.d.get(i, s), m)
    }

    /// Offset in [`QMatrix::hi`] of the group holding block `b` for the row
    /// pair of row `r` (add `16·(r & 1)` and `32` for values 16–31).
    #[inline]
    pub fn hi_index(&self, r: usize, b: usize) -> usize {
        let g = self.packing.hi_group();
        let groups = self.blocks_per_row().div_ceil(g);
        (((r / TILE) * groups + b / g) * (TILE / 2) + (r % TILE) / 2) * HI_PAIR_BYTES
    }

    /// Where value `j` of block `b` of row `r` keeps its high bits: (byte,
    /// lowest bit, mask of the bits once shifted down).
    #[inline]
    fn hi_bit(&self, r: usize, b: usize, j: usize) -> (usize, u8, u8) {
        let at = self.hi_index(r, b) + (j / 16) * 32 + (r & 1) * 16 + j % 16;
        let bits = self.packing.hi_bits();
        let k = (b % self.packing.hi_group()) * bits;
        (at, k as u8, (1u8 << bits) - 1)
    }

    /// The 32 stored values of block `b` of row `r` (`u`, or `q` as bytes for
    /// [`Packing::I8`]).
    pub fn values(&self, r: usize, b: usize) -> [u8; QK] {
        let n = self.packing.bytes();
        let i = self.index(r, b);
        let p = &self.qs[i * n..(i + 1) * n];
        let mut u = [0u8; QK];
        match self.packing {
            Packing::I8 => u.copy_from_slice(p),
            Packing::U4 | Packing::U5 | Packing::U6 => {
                for j in 0..16 {
                    u[j] = p[j] & 0xF;
                    u[j + 16] = p[j] >> 4;
                }
                if self.packing.hi_bits() > 0 {
                    for (j, x) in u.iter_mut().enumerate() {
                        let (at, k, mask) = self.hi_bit(r, b, j);
                        *x |= ((self.hi[at] >> k) & mask) << 4;
                    }
                }
            }
        }
        u
    }

    /// Store the 32 values `u` of block `b` of row `r`.
    fn set_values(&mut self, r: usize, b: usize, u: &[u8; QK]) {
        let n = self.packing.bytes();
        let i = self.index(r, b);
        let p = &mut self.qs[i * n..(i + 1) * n];
        match self.packing {
            Packing::I8 => p.copy_from_slice(u),
            Packing::U4 | Packing::U5 | Packing::U6 => {
                for j in 0..16 {
                    p[j] = (u[j] & 0xF) | ((u[j + 16] & 0xF) << 4);
                }
                if self.packing.hi_bits() > 0 {
                    for (j, &x) in u.iter().enumerate() {
                        let (at, k, mask) = self.hi_bit(r, b, j);
                        self.hi[at] = (self.hi[at] & !(mask << k)) | (((x >> 4) & mask) << k);
                    }
                }
            }
        }
    }

    /// Whether the kernels apply an offset term (4- and 5-bit packings; the
    /// 6-bit zero is folded into the integer sum with the sub-scales).
    pub fn has_offset(&self) -> bool {
        matches!(self.packing, Packing::U4 | Packing::U5)
    }

    /// Block `b` of row `r`.
    pub fn block(&self, r: usize, b: usize) -> Block {
        let (i, s) = (self.index(r, b), self.super_index(r, b));
        let u = self.values(r, b);
        let mut q = [0i8; QK];
        for (q, &u) in q.iter_mut().zip(&u) {
            *q = match self.packing {
                Packing::I8 => u as i8,
                _ => u as i8 - self.zero,
            };
        }
        Block {
            q,
            d: self.d.get(i, s),
            m: self.m.as_ref().map_or(0.0, |m| m.get(i, s)),
            sub: self.sub.as_ref().map_or([1, 1], |v| v[i]),
            d_parts: self.d.parts(i, s),
            m_parts: self.m.as_ref().and_then(|m| m.parts(i, s)),
        }
    }

    /// Store block `b` of row `r` (its values must fit the packing).
    pub fn set_block(&mut self, r: usize, b: usize, blk: &Block) {
        let (i, s) = (self.index(r, b), self.super_index(r, b));
        let mut u = [0u8; QK];
        for (u, &q) in u.iter_mut().zip(&blk.q) {
            *u = match self.packing {
                Packing::I8 => q as u8,
                _ => (q + self.zero) as u8,
            };
        }
        self.set_values(r, b, &u);
        self.d.set(i, s, blk.d, blk.d_parts);
        if let Some(m) = self.m.as_mut() {
            m.set(i, s, blk.m, blk.m_parts);
        }
        if let Some(v) = self.sub.as_mut() {
            v[i] = blk.sub;
        }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        self.qs.len()
            + self.hi.len()
            + self.d.bytes()
            + self.m.as_ref().map_or(0, Scales::bytes)
            + self.sub.as_ref().map_or(0, |s| 2 * s.len())
    }

    /// Write row `r` as f32 values (the exact stored values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for (b, chunk) in out[..self.cols].chunks_exact_mut(QK).enumerate() {
            let blk = self.block(r, b);
            for (e, o) in chunk.iter_mut().enumerate() {
                let ds = blk.d * blk.sub[e / 16] as f32;
                *o = ds * blk.q[e] as f32 + blk.m;
            }
        }
    }

    /// All rows as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            self.dequantize_row(r, &mut out[r * self.cols..(r + 1) * self.cols]);
        }
        out
    }

    /// Quantize dense row-major f32 values to Q8_0-style blocks.
    pub fn quantize_f32(values: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(values.len(), rows * cols);
        let mut out = Self::zeros(rows, cols, Packing::I8, 0, ScaleKind::F32, None, false);
        let mut blk = Block::default();
        for (i, x) in values.chunks_exact(QK).enumerate() {
            blk.d = quantize_block(x, &mut blk.q).0;
            out.set_block(i / (cols / QK), i % (cols / QK), &blk);
        }
        out
    }

    /// Stack matrices with the same number of columns and the same optional
    /// parts along the rows (e.g. q|k|v or gate|up), or `None` when they differ.
    pub fn concat(parts: &[&QMatrix]) -> Option<QMatrix> {
        let first = parts.first()?;
        let same = parts.iter().all(|p| {
            p.cols == first.cols
                && p.packing == first.packing
                && p.zero == first.zero
                && p.d.kind() == first.d.kind()
                && p.m.as_ref().map(Scales::kind) == first.m.as_ref().map(Scales::kind)
                && p.sub.is_some() == first.sub.is_some()
        });
        if !same {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        if parts[..parts.len() - 1].iter().all(|p| p.rows % TILE == 0) {
            // Whole tiles: every array is the parts' arrays end to end (the
            // layouts are tile-major, padding rows are zeros either way).
            return Some(QMatrix {
                rows,
                cols: first.cols,
                packing: first.packing,
                zero: first.zero,
                qs: cat(parts.iter().map(|p| p.qs.as_slice())),
                hi: cat(parts.iter().map(|p| p.hi.as_slice())),
                d: Scales::concat(parts.iter().map(|p| &p.d)),
                m: first
                    .m
                    .as_ref()
                    .map(|_| Scales::concat(parts.iter().filter_map(|p| p.m.as_ref()))),
                sub: first
                    .sub
                    .as_ref()
                    .map(|_| cat(parts.iter().filter_map(|p| p.sub.as_deref()))),
            });
        }
        let mut out = Self::zeros(
            rows,
            first.cols,
            first.packing,
            first.zero,
            first.d.kind(),
            first.m.as_ref().map(Scales::kind),
            first.sub.is_some(),
        );
        let mut r0 = 0;
        for p in parts {
            for r in 0..p.rows {
                for b in 0..p.blocks_per_row() {
                    out.set_block(r0 + r, b, &p.block(r, b));
                }
            }
            r0 += p.rows;
        }
        Some(out)
    }

    /// Convert a 2-D GGUF tensor. Block formats listed in the module docs are
    /// converted exactly; others are dequantized and quantized to Q8_0 blocks.
    pub fn from_qtensor(t: &QTensor) -> candle_core::Result<Self> {
        let dims = t.shape().dims();
        if dims.len() != 2 {
            candle_core::bail!("expected a 2-D weight, got shape {:?}", dims);
        }
        let (rows, cols) = (dims[0], dims[1]);
        if cols % QK != 0 {
            candle_core::bail!("{cols} input features are not a multiple of {QK}");
        }
        let Some(conv) = Converter::for_dtype(t.dtype()) else {
            let f = t
                .dequantize(&candle_core::Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            return Ok(Self::quantize_f32(&f, rows, cols));
        };
        if cols % conv.elems != 0 {
            candle_core::bail!(
                "{cols} columns are not a multiple of the {:?} block",
                t.dtype()
            );
        }
        let data = t.data()?;
        let expected = rows * cols / conv.elems * conv.bytes;
        if data.len() != expected {
            candle_core::bail!(
                "{:?} tensor holds {} bytes, expected {expected}",
                t.dtype(),
                data.len()
            );
        }
        let mut out = Self::zeros(
            rows,
            cols,
            conv.packing,
            conv.zero,
            conv.d,
            conv.m,
            conv.sub,
        );
        let per = conv.elems / QK;
        let nb = cols / QK;
        let mut blk = [Block::default(); 8];
        for (s, src) in data.chunks_exact(conv.bytes).enumerate() {
            (conv.f)(src, &mut blk[..per]);
            for (i, b) in blk[..per].iter().enumerate() {
                let bi = s * per + i;
                out.set_block(bi / nb, bi % nb, b);
            }
        }
        Ok(out)
    }
}

/// Quantize 32 values to int8 with `d = amax/127`; returns `d` and the sums
/// of the two 16-value halves of `q`.
pub fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, [i16; 2]) {
    let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = [0i16; 2];
    for (j, (o, &v)) in q.iter_mut().zip(x).enumerate() {
        let r = (v * id).round().clamp(-127.0, 127.0) as i8;
        // |Σ| ≤ 16 · 127: fits i16.
        sum[j / 16] += r as i16;
        *o = r;
    }
    (d, sum)
}

/// [`quantize_block`] for `tier`: the AVX2 form on every x86 tier (the same
/// bits; the engine's norm + quantize phase took 5× less time with it on
/// the Zen 5 VM), the scalar one otherwise.
pub fn block_quantizer(tier: Tier) -> fn(&[f32], &mut [i8]) -> (f32, [i16; 2]) {
    #[cfg(target_arch = "x86_64")]
    if tier.has_avx2() && tier.supported() {
        // SAFETY: the tier's CPU features include AVX2 and FMA (checked above).
        return |x, q| unsafe { super::avx2::quantize_block(x, q) };
    }
    let _ = tier;
    quantize_block
}

/// Activations `(rows, cols)` quantized to int8 blocks: values, scales,
/// `d · Σq` per block (for weight formats with an offset) and the integer
/// sums of each 16-value half (for the 6-bit format's zero).
#[derive(Debug, Clone, Default)]
pub struct QActs {
    /// Rows.
    pub rows: usize,
    /// Columns (a multiple of [`QK`]).
    pub cols: usize,
    /// Values.
    pub qs: Vec<i8>,
    /// Scale per block.
    pub d: Vec<f32>,
    /// `d · Σq` per block.
    pub s: Vec<f32>,
    /// `Σq` of each 16-value half per block.
    pub h: Vec<[i16; 2]>,
}

/// One activation row, borrowed.
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    /// Values.
    pub qs: &'a [i8],
    /// Scale per block.
    pub d: &'a [f32],
    /// `d · Σq` per block.
    pub s: &'a [f32],
    /// `Σq` of each 16-value half per block.
    pub h: &'a [[i16; 2]],
}

impl QActs {
    /// Quantize row-major f32 activations (reusing this buffer's memory).
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        assert_eq!(x.len(), rows * cols);
        assert_eq!(cols % QK, 0);
        self.rows = rows;
        self.cols = cols;
        self.qs.resize(rows * cols, 0);
        self.d.resize(rows * cols / QK, 0.0);
        self.s.resize(rows * cols / QK, 0.0);
        self.h.resize(rows * cols / QK, [0; 2]);
        let nb = cols / QK;
        let (qs, d, s, h) = (
            SharedMut::new(&mut self.qs),
            SharedMut::new(&mut self.d),
            SharedMut::new(&mut self.s),
            SharedMut::new(&mut self.h),
        );
        let quantize: fn(&[f32], &mut [i8]) -> (f32, [i16; 2]) = block_quantizer(Tier::active());
        team::for_ranges(rows, (1usize << 15).div_ceil(cols), &|r| {
            // SAFETY: row ranges are disjoint.
            let (qr, dr, sr, hr) = unsafe {
                (
                    qs.range(r.start * cols, r.end * cols),
                    d.range(r.start * nb, r.end * nb),
                    s.range(r.start * nb, r.end * nb),
                    h.range(r.start * nb, r.end * nb),
                )
            };
            let xr = &x[r.start * cols..r.end * cols];
            for (i, xb) in xr.chunks_exact(QK).enumerate() {
                let (di, halves) = quantize(xb, &mut qr[i * QK..(i + 1) * QK]);
                dr[i] = di;
                sr[i] = di * (halves[0] as i32 + halves[1] as i32) as f32;
                hr[i] = halves;
            }
        });
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> ActRow<'_> {
        let nb = self.cols / QK;
        ActRow {
            qs: &self.qs[r * self.cols..(r + 1) * self.cols],
            d: &self.d[r * nb..(r + 1) * nb],
            s: &self.s[r * nb..(r + 1) * nb],
            h: &self.h[r * nb..(r + 1) * nb],
        }
    }
}

struct Converter {
    /// Elements per source block.
    elems: usize,
    /// Bytes per source block.
    bytes: usize,
    packing: Packing,
    zero: i8,
    d: ScaleKind,
    m: Option<ScaleKind>,
    sub: bool,
    f: fn(&[u8], &mut [Block]),
}

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q4_K / Q5_K 6-bit scale and min of sub-block `j` (ggml `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

impl Converter {
    fn for_dtype(dt: GgmlDType) -> Option<Converter> {
        use ScaleKind::{Super, F16};
        let c = |elems, bytes, packing, zero, d, m, f| {
            Some(Converter {
                elems,
                bytes,
                packing,
                zero,
                d,
                m,
                sub: false,
                f,
            })
        };
        match dt {
            GgmlDType::Q8_0 => c(32, 34, Packing::I8, 0, F16, None, |s, o| {
                o[0].d = h(s, 0);
                for (q, &b) in o[0].q.iter_mut().zip(&s[2..34]) {
                    *q = b as i8;
                }
            }),
            GgmlDType::Q4_0 => c(32, 18, Packing::U4, 8, F16, None, |s, o| {
                o[0].d = h(s, 0);
                for j in 0..16 {
                    o[0].q[j] = (s[2 + j] & 0xF) as i8 - 8;
                    o[0].q[j + 16] = (s[2 + j] >> 4) as i8 - 8;
                }
            }),
            GgmlDType::Q4_1 => c(32, 20, Packing::U4, 0, F16, Some(F16), |s, o| {
                o[0].d = h(s, 0);
                o[0].m = h(s, 2);
                for j in 0..16 {
                    o[0].q[j] = (s[4 + j] & 0xF) as i8;
                    o[0].q[j + 16] = (s[4 + j] >> 4) as i8;
                }
            }),
            GgmlDType::Q5_0 => c(32, 22, Packing::U5, 16, F16, None, |s, o| {
                o[0].d = h(s, 0);
                let qh = u32::from_le_bytes([s[2], s[3], s[4], s[5]]);
                for j in 0..16 {
                    let h0 = (((qh >> j) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                    o[0].q[j] = ((s[6 + j] & 0xF) | h0) as i8 - 16;
                    o[0].q[j + 16] = ((s[6 + j] >> 4) | h1) as i8 - 16;
                }
            }),
            GgmlDType::Q5_1 => c(32, 24, Packing::U5, 0, F16, Some(F16), |s, o| {
                o[0].d = h(s, 0);
                o[0].m = h(s, 2);
                let qh = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
                for j in 0..16 {
                    let h0 = (((qh >> j) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                    o[0].q[j] = ((s[8 + j] & 0xF) | h0) as i8;
                    o[0].q[j + 16] = ((s[8 + j] >> 4) | h1) as i8;
                }
            }),
            GgmlDType::Q4K => c(256, 144, Packing::U4, 0, Super, Some(Super), |s, o| {
                let (d, dmin) = (h(s, 0), h(s, 2));
                let scales = &s[4..16];
                let qs = &s[16..144];
                for g in 0..4 {
                    let q = &qs[32 * g..32 * g + 32];
                    for half in 0..2 {
                        let (sc, m) = scale_min_k4(2 * g + half, scales);
                        let b = &mut o[2 * g + half];
                        b.d = d * sc as f32;
                        b.m = -(dmin * m as f32);
                        b.d_parts = Some((d, sc));
                        b.m_parts = Some((-dmin, m));
                        for (dst, &v) in b.q.iter_mut().zip(q) {
                            *dst = if half == 0 { v & 0xF } else { v >> 4 } as i8;
                        }
                    }
                }
            }),
            GgmlDType::Q5K => c(256, 176, Packing::U5, 0, Super, Some(Super), |s, o| {
                let (d, dmin) = (h(s, 0), h(s, 2));
                let scales = &s[4..16];
                let qh = &s[16..48];
                let qs = &s[48..176];
                for g in 0..4 {
                    let ql = &qs[32 * g..32 * g + 32];
                    for half in 0..2 {
                        let (sc, m) = scale_min_k4(2 * g + half, scales);
                        let u = 1u8 << (2 * g + half);
                        let b = &mut o[2 * g + half];
                        b.d = d * sc as f32;
                        b.m = -(dmin * m as f32);
                        b.d_parts = Some((d, sc));
                        b.m_parts = Some((-dmin, m));
                        for l in 0..32 {
                            let lo = if half == 0 { ql[l] & 0xF } else { ql[l] >> 4 };
                            b.q[l] = (lo + if qh[l] & u != 0 { 16 } else { 0 }) as i8;
                        }
                    }
                }
            }),
            GgmlDType::Q6K => c(256, 210, Packing::U6, 32, F16, None, |s, o| {
                let ql = &s[0..128];
                let qh = &s[128..192];
                let sc = &s[192..208];
                let d = h(s, 208);
                for n in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                    for k in 0..4 {
                        let b = &mut o[4 * n + k];
                        b.d = d;
                        b.sub = [sc[2 * k] as i8, sc[2 * k + 1] as i8];
                        for l in 0..32 {
                            let v = match k {
                                0 => (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                                1 => (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                                2 => (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                                _ => (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                            };
                            b.q[l] = v as i8 - 32;
                        }
                    }
                }
            })
            .map(|c| Converter { sub: true, ..c }),
            _ => None,
        }
    }
}
