//! Weight and activation block formats of the int8 kernels, and the lossless
//! conversion of GGUF block formats into them.
//!
//! Every weight matrix is rows of 32-element blocks with one f32 scale `d`, an
//! optional f32 offset `m` (the "min" of Q4_1/Q5_1/Q4_K/Q5_K) and optional
//! integer sub-scales per 16 values (Q6_K); a weight value is `(d · sub) · q + m`,
//! exactly the value the GGUF file stores: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
//! Q5_K and Q6_K convert without loss (checked in the tests against candle's
//! dequantization); other types (F32, F16, …) are quantized to Q8_0-style blocks.
//!
//! Values keep their bit width ([`Packing`]): 8-bit as `i8`, 4-bit as nibbles,
//! 5-bit as nibbles plus a bit plane, 6-bit as nibbles plus two bit planes, so a
//! decode step streams about the GGUF's bytes. 4- and 5-bit values are stored
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
    /// Unsigned 5-bit values (20): nibbles as [`Packing::U4`], then 32 bits of bit 4.
    U5,
    /// 6-bit values `q + 32` (24): nibbles, then 32 bits of bit 4, 32 bits of bit 5.
    U6,
}

impl Packing {
    /// Bytes per block and row.
    pub fn bytes(self) -> usize {
        match self {
            Packing::I8 => 32,
            Packing::U4 => 16,
            Packing::U5 => 20,
            Packing::U6 => 24,
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
    /// For [`Packing::U4`]/[`Packing::U5`]: stored `u = q + zero` (8 for Q4_0,
    /// 16 for Q5_0, 0 for formats with a min).
    pub zero: i8,
    /// Values, `[tile][block][row in tile][packing.bytes()]`.
    pub qs: Vec<u8>,
    /// Scales, `[tile][block][row in tile]`.
    pub d: Vec<f32>,
    /// Offsets (formats with a min), same layout as `d`, else `None`.
    pub m: Option<Vec<f32>>,
    /// Sub-scales per 16 values (Q6_K), same layout as `d`, else `None`.
    pub sub: Option<Vec<[i16; 2]>>,
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
    pub sub: [i16; 2],
}

impl Default for Block {
    fn default() -> Self {
        Self {
            q: [0; QK],
            d: 0.0,
            m: 0.0,
            sub: [1, 1],
        }
    }
}

/// Pack 32 unsigned values (< 64) into `out` as `packing` lays them out.
fn pack(u: &[u8; QK], packing: Packing, out: &mut [u8]) {
    match packing {
        Packing::I8 => out.copy_from_slice(u),
        _ => {
            for j in 0..16 {
                out[j] = (u[j] & 0xF) | ((u[j + 16] & 0xF) << 4);
            }
            let plane = |bit: u8| -> [u8; 4] {
                let mut v = 0u32;
                for (e, &x) in u.iter().enumerate() {
                    v |= (((x >> bit) & 1) as u32) << e;
                }
                v.to_le_bytes()
            };
            if packing != Packing::U4 {
                out[16..20].copy_from_slice(&plane(4));
            }
            if packing == Packing::U6 {
                out[20..24].copy_from_slice(&plane(5));
            }
        }
    }
}

/// The 32 stored values of a packed block (`u`, or `q` for [`Packing::I8`]).
pub fn unpack(p: &[u8], packing: Packing) -> [u8; QK] {
    let mut u = [0u8; QK];
    match packing {
        Packing::I8 => u.copy_from_slice(&p[..QK]),
        _ => {
            for j in 0..16 {
                u[j] = p[j] & 0xF;
                u[j + 16] = p[j] >> 4;
            }
            let bit = |at: usize, e: usize| (p[at + e / 8] >> (e % 8)) & 1;
            for (e, x) in u.iter_mut().enumerate() {
                if packing != Packing::U4 {
                    *x |= bit(16, e) << 4;
                }
                if packing == Packing::U6 {
                    *x |= bit(20, e) << 5;
                }
            }
        }
    }
    u
}

impl QMatrix {
    /// A zero matrix with room for `rows × cols` (rows padded to whole tiles).
    pub fn zeros(rows: usize, cols: usize, packing: Packing, zero: i8, has_min: bool) -> Self {
        assert_eq!(
            cols % QK,
            0,
            "{cols} input features are not a multiple of {QK}"
        );
        let blocks = rows.div_ceil(TILE) * TILE * (cols / QK);
        Self {
            rows,
            cols,
            packing,
            zero,
            qs: vec![0; blocks * packing.bytes()],
            d: vec![0.0; blocks],
            m: has_min.then(|| vec![0.0; blocks]),
            sub: (packing == Packing::U6).then(|| vec![[1, 1]; blocks]),
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

    /// The stored bytes of block `b` of row `r`.
    pub fn packed(&self, r: usize, b: usize) -> &[u8] {
        let n = self.packing.bytes();
        let i = self.index(r, b);
        &self.qs[i * n..(i + 1) * n]
    }

    /// Offset of block index `i` as the kernels use it: `m − zero · d`.
    #[inline]
    pub fn offset(&self, i: usize) -> f32 {
        let m = self.m.as_ref().map_or(0.0, |m| m[i]);
        (-(self.zero as f32)).mul_add(self.d[i], m)
    }

    /// Whether the kernels apply an offset term (4- and 5-bit packings).
    pub fn has_offset(&self) -> bool {
        matches!(self.packing, Packing::U4 | Packing::U5)
    }

    /// Block `b` of row `r`.
    pub fn block(&self, r: usize, b: usize) -> Block {
        let i = self.index(r, b);
        let u = unpack(self.packed(r, b), self.packing);
        let mut q = [0i8; QK];
        for (q, &u) in q.iter_mut().zip(&u) {
            *q = match self.packing {
                Packing::I8 => u as i8,
                Packing::U6 => u as i8 - 32,
                _ => u as i8 - self.zero,
            };
        }
        Block {
            q,
            d: self.d[i],
            m: self.m.as_ref().map_or(0.0, |m| m[i]),
            sub: self.sub.as_ref().map_or([1, 1], |s| s[i]),
        }
    }

    /// Store block `b` of row `r` (its values must fit the packing).
    pub fn set_block(&mut self, r: usize, b: usize, blk: &Block) {
        let i = self.index(r, b);
        let mut u = [0u8; QK];
        for (u, &q) in u.iter_mut().zip(&blk.q) {
            *u = match self.packing {
                Packing::I8 => q as u8,
                Packing::U6 => (q + 32) as u8,
                _ => (q + self.zero) as u8,
            };
        }
        let n = self.packing.bytes();
        pack(&u, self.packing, &mut self.qs[i * n..(i + 1) * n]);
        self.d[i] = blk.d;
        if let Some(m) = self.m.as_mut() {
            m[i] = blk.m;
        }
        if let Some(s) = self.sub.as_mut() {
            s[i] = blk.sub;
        }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        self.qs.len()
            + 4 * self.d.len()
            + self.m.as_ref().map_or(0, |m| 4 * m.len())
            + self.sub.as_ref().map_or(0, |s| 4 * s.len())
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
        let mut out = Self::zeros(rows, cols, Packing::I8, 0, false);
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
                && p.m.is_some() == first.m.is_some()
        });
        if !same {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut out = Self::zeros(
            rows,
            first.cols,
            first.packing,
            first.zero,
            first.m.is_some(),
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
        let mut out = Self::zeros(rows, cols, conv.packing, conv.zero, conv.has_min);
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

/// Quantize 32 values to int8 with `d = amax/127`; returns `(d, Σq)`.
pub fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (o, &v) in q.iter_mut().zip(x) {
        let r = (v * id).round().clamp(-127.0, 127.0) as i8;
        sum += r as i32;
        *o = r;
    }
    (d, sum)
}

/// Activations `(rows, cols)` quantized to int8 blocks: values, scales and
/// `d · Σq` per block (for weight formats with an offset).
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
        let nb = cols / QK;
        let (qs, d, s) = (
            SharedMut::new(&mut self.qs),
            SharedMut::new(&mut self.d),
            SharedMut::new(&mut self.s),
        );
        team::for_ranges(rows, (1usize << 15).div_ceil(cols), &|r| {
            // SAFETY: row ranges are disjoint.
            let (qr, dr, sr) = unsafe {
                (
                    qs.range(r.start * cols, r.end * cols),
                    d.range(r.start * nb, r.end * nb),
                    s.range(r.start * nb, r.end * nb),
                )
            };
            let xr = &x[r.start * cols..r.end * cols];
            for (i, xb) in xr.chunks_exact(QK).enumerate() {
                let (di, sum) = quantize_block(xb, &mut qr[i * QK..(i + 1) * QK]);
                dr[i] = di;
                sr[i] = di * sum as f32;
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
    has_min: bool,
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
        let c = |elems, bytes, packing, zero, has_min, f| {
            Some(Converter {
                elems,
                bytes,
                packing,
                zero,
                has_min,
                f,
            })
        };
        match dt {
            GgmlDType::Q8_0 => c(32, 34, Packing::I8, 0, false, |s, o| {
                o[0].d = h(s, 0);
                for (q, &b) in o[0].q.iter_mut().zip(&s[2..34]) {
                    *q = b as i8;
                }
            }),
            GgmlDType::Q4_0 => c(32, 18, Packing::U4, 8, false, |s, o| {
                o[0].d = h(s, 0);
                for j in 0..16 {
                    o[0].q[j] = (s[2 + j] & 0xF) as i8 - 8;
                    o[0].q[j + 16] = (s[2 + j] >> 4) as i8 - 8;
                }
            }),
            GgmlDType::Q4_1 => c(32, 20, Packing::U4, 0, true, |s, o| {
                o[0].d = h(s, 0);
                o[0].m = h(s, 2);
                for j in 0..16 {
                    o[0].q[j] = (s[4 + j] & 0xF) as i8;
                    o[0].q[j + 16] = (s[4 + j] >> 4) as i8;
                }
            }),
            GgmlDType::Q5_0 => c(32, 22, Packing::U5, 16, false, |s, o| {
                o[0].d = h(s, 0);
                let qh = u32::from_le_bytes([s[2], s[3], s[4], s[5]]);
                for j in 0..16 {
                    let h0 = (((qh >> j) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                    o[0].q[j] = ((s[6 + j] & 0xF) | h0) as i8 - 16;
                    o[0].q[j + 16] = ((s[6 + j] >> 4) | h1) as i8 - 16;
                }
            }),
            GgmlDType::Q5_1 => c(32, 24, Packing::U5, 0, true, |s, o| {
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
            GgmlDType::Q4K => c(256, 144, Packing::U4, 0, true, |s, o| {
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
                        for (dst, &v) in b.q.iter_mut().zip(q) {
                            *dst = if half == 0 { v & 0xF } else { v >> 4 } as i8;
                        }
                    }
                }
            }),
            GgmlDType::Q5K => c(256, 176, Packing::U5, 0, true, |s, o| {
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
                        for l in 0..32 {
                            let lo = if half == 0 { ql[l] & 0xF } else { ql[l] >> 4 };
                            b.q[l] = (lo + if qh[l] & u != 0 { 16 } else { 0 }) as i8;
                        }
                    }
                }
            }),
            GgmlDType::Q6K => c(256, 210, Packing::U6, 0, false, |s, o| {
                let ql = &s[0..128];
                let qh = &s[128..192];
                let sc = &s[192..208];
                let d = h(s, 208);
                for n in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                    for k in 0..4 {
                        let b = &mut o[4 * n + k];
                        b.d = d;
                        b.sub = [sc[2 * k] as i8 as i16, sc[2 * k + 1] as i8 as i16];
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
            }),
            _ => None,
        }
    }
}
