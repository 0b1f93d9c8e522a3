//! The CPU executor: the transformer forward of [`super::model`] on plain f32
//! buffers, with every weight matmul on the int8 block kernels of
//! [`super::kernels`] (weights held in their GGUF block format, about the file's
//! size in memory), q|k|v and gate|up fused into one matmul each, RoPE and the
//! KV append done in place, and attention read directly from each sequence's
//! KV buffer (no per-step copies), parallel over (sequence, kv-head).
//!
//! Every row's arithmetic is independent of the other rows of the packed batch,
//! so a sequence's logits are bit-identical alone or in any batch, for any
//! thread count and kernel tier — the property the engine's reproducibility
//! (batched == sequential) rests on.

use super::kernels::{matmul, QActs, QMatrix, Tier};
use super::model::ModelConfig;
use super::profile::{time, Phase};
use rayon::prelude::*;

/// A weight matrix in int8 blocks, or a group of matrices applied to the same
/// input whose outputs are concatenated (fused into one when their formats agree).
pub struct Proj {
    parts: Vec<QMatrix>,
    /// Total output features.
    pub rows: usize,
}

impl Proj {
    /// Fuse `parts` (same input) into as few matrices as their formats allow.
    pub fn fuse(parts: Vec<QMatrix>) -> Self {
        let rows = parts.iter().map(|p| p.rows).sum();
        let refs: Vec<&QMatrix> = parts.iter().collect();
        let parts = match QMatrix::concat(&refs) {
            Some(one) if parts.len() > 1 => vec![one],
            _ => parts,
        };
        Self { parts, rows }
    }

    /// `out (acts.rows × self.rows)`.
    fn apply(&self, tier: Tier, acts: &QActs, out: &mut [f32]) {
        let mut off = 0;
        for p in &self.parts {
            matmul(tier, p, acts, &mut out[off..], self.rows);
            off += p.rows;
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(QMatrix::bytes).sum()
    }
}

/// One transformer block.
pub struct Int8Layer {
    /// Attention RMSNorm weight.
    pub attn_norm: Vec<f32>,
    /// q|k|v projection.
    pub qkv: Proj,
    /// q|k|v bias (qwen2), same layout as the projection's output.
    pub qkv_bias: Option<Vec<f32>>,
    /// Attention output projection.
    pub wo: Proj,
    /// Feed-forward RMSNorm weight.
    pub ffn_norm: Vec<f32>,
    /// gate|up projection.
    pub gate_up: Proj,
    /// Down projection.
    pub down: Proj,
}

/// A model held for the CPU executor.
pub struct Int8Model {
    /// Blocks.
    pub layers: Vec<Int8Layer>,
    /// Token embedding (rows dequantized on lookup).
    pub embed: QMatrix,
    /// Final RMSNorm weight.
    pub norm: Vec<f32>,
    /// Output head; `None` = tied to the embedding.
    pub lm_head: Option<QMatrix>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    tier: Tier,
}

/// One layer's KV of one sequence: `[token][kv_head][head_dim]`, K and V.
#[derive(Clone, Default)]
pub struct RawKv {
    /// Keys.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
}

/// One sequence's part of a packed forward.
pub struct RawChunk<'a> {
    /// Its KV, one entry per layer, extended by this forward.
    pub kv: &'a mut [RawKv],
    /// Tokens already cached.
    pub past: usize,
    /// New tokens.
    pub tokens: &'a [u32],
}

fn add_into(x: &mut [f32], o: &[f32]) {
    for (a, b) in x.iter_mut().zip(o) {
        *a += b;
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum();
        let scale = 1.0 / (ss / h as f32 + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * scale * g;
        }
    }
}

#[inline]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = super::kernels::scalar::hsum8(acc);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

struct SyncPtr(*mut f32);
// SAFETY: work items write disjoint parts of the output.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

impl Int8Model {
    /// Assemble, precomputing the RoPE tables for `cfg`.
    pub fn new(
        cfg: &ModelConfig,
        layers: Vec<Int8Layer>,
        embed: QMatrix,
        norm: Vec<f32>,
        lm_head: Option<QMatrix>,
    ) -> Self {
        let half = cfg.head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1f32 / (cfg.rope_theta as f32).powf(2.0 * i as f32 / cfg.head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(cfg.max_position * half);
        let mut sin = Vec::with_capacity(cfg.max_position * half);
        for p in 0..cfg.max_position {
            for &f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Self {
            layers,
            embed,
            norm,
            lm_head,
            cos,
            sin,
            tier: Tier::active(),
        }
    }

    /// Kernel tier in use.
    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| l.qkv.bytes() + l.wo.bytes() + l.gate_up.bytes() + l.down.bytes())
            .sum();
        l + self.embed.bytes() + self.lm_head.as_ref().map_or(0, QMatrix::bytes)
    }

    fn rope(&self, cfg: &ModelConfig, v: &mut [f32], pos: usize) {
        let hd = cfg.head_dim;
        let half = hd / 2;
        let (cos, sin) = (
            &self.cos[pos * half..(pos + 1) * half],
            &self.sin[pos * half..(pos + 1) * half],
        );
        for head in v.chunks_exact_mut(hd) {
            for i in 0..half {
                let (a, b) = if cfg.rope_interleaved {
                    (2 * i, 2 * i + 1)
                } else {
                    (i, i + half)
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[i] - x1 * sin[i];
                head[b] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }

    /// Packed forward: appends each chunk's tokens to its KV and returns the
    /// logits of each chunk's last token.
    pub fn forward(&self, cfg: &ModelConfig, chunks: &mut [RawChunk<'_>]) -> Vec<Vec<f32>> {
        let tier = self.tier;
        let (h, nh, nkv, hd) = (cfg.hidden, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let eps = cfg.rms_eps as f32;
        let (qd, kvd) = (nh * hd, nkv * hd);
        let qkv_w = qd + 2 * kvd;
        let t: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        // Token positions and chunk offsets in the packed batch.
        let mut offs = Vec::with_capacity(chunks.len());
        let mut pos = Vec::with_capacity(t);
        for c in chunks.iter() {
            offs.push(pos.len());
            pos.extend(c.past..c.past + c.tokens.len());
        }
        let mut x = vec![0f32; t * h];
        time(Phase::Embed, || {
            let ids = chunks.iter().flat_map(|c| c.tokens.iter());
            for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
                self.embed.dequantize_row(id as usize, row);
            }
        });
        let inter = self.layers.first().map_or(0, |l| l.gate_up.rows / 2);
        let mut hbuf = vec![0f32; t * h];
        let mut acts = QActs::default();
        let mut qkv = vec![0f32; t * qkv_w];
        let mut y = vec![0f32; t * qd];
        let mut o = vec![0f32; t * h];
        let mut gu = vec![0f32; t * 2 * inter];
        let mut act = vec![0f32; t * inter];
        for (li, layer) in self.layers.iter().enumerate() {
            time(Phase::NormQuant, || {
                rms_norm(&x, &layer.attn_norm, eps, &mut hbuf);
                acts.quantize(&hbuf, t, h);
            });
            time(Phase::Matmul, || layer.qkv.apply(tier, &acts, &mut qkv));
            time(Phase::RopeKv, || {
                for (ri, row) in qkv.chunks_exact_mut(qkv_w).enumerate() {
                    if let Some(b) = &layer.qkv_bias {
                        add_into(row, b);
                    }
                    let (q, kv) = row.split_at_mut(qd);
                    self.rope(cfg, q, pos[ri]);
                    self.rope(cfg, &mut kv[..kvd], pos[ri]);
                }
                for (c, &off) in chunks.iter_mut().zip(&offs) {
                    let cache = &mut c.kv[li];
                    let rows = &qkv[off * qkv_w..(off + c.tokens.len()) * qkv_w];
                    for row in rows.chunks_exact(qkv_w) {
                        cache.k.extend_from_slice(&row[qd..qd + kvd]);
                        cache.v.extend_from_slice(&row[qd + kvd..]);
                    }
                }
            });
            time(Phase::Attention, || {
                self.attention(cfg, chunks, &offs, li, &qkv, &mut y)
            });
            time(Phase::NormQuant, || acts.quantize(&y, t, qd));
            time(Phase::Matmul, || layer.wo.apply(tier, &acts, &mut o));
            time(Phase::Elementwise, || add_into(&mut x, &o));
            time(Phase::NormQuant, || {
                rms_norm(&x, &layer.ffn_norm, eps, &mut hbuf);
                acts.quantize(&hbuf, t, h);
            });
            time(Phase::Matmul, || layer.gate_up.apply(tier, &acts, &mut gu));
            time(Phase::Elementwise, || {
                for (g, a) in gu.chunks_exact(2 * inter).zip(act.chunks_exact_mut(inter)) {
                    let (gate, up) = g.split_at(inter);
                    for ((a, &g), &u) in a.iter_mut().zip(gate).zip(up) {
                        *a = g / (1.0 + (-g).exp()) * u;
                    }
                }
            });
            time(Phase::NormQuant, || acts.quantize(&act, t, inter));
            time(Phase::Matmul, || layer.down.apply(tier, &acts, &mut o));
            time(Phase::Elementwise, || add_into(&mut x, &o));
        }
        let n = chunks.len();
        let mut last = vec![0f32; n * h];
        for (i, (c, &off)) in chunks.iter().zip(&offs).enumerate() {
            let r = off + c.tokens.len() - 1;
            last[i * h..(i + 1) * h].copy_from_slice(&x[r * h..(r + 1) * h]);
        }
        let mut normed = vec![0f32; n * h];
        time(Phase::NormQuant, || {
            rms_norm(&last, &self.norm, eps, &mut normed);
            acts.quantize(&normed, n, h);
        });
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let vocab = head.rows;
        let mut logits = vec![0f32; n * vocab];
        time(Phase::Matmul, || matmul(tier, head, &acts, &mut logits, vocab));
        logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect()
    }

    /// Causal attention of each chunk's new tokens over its whole KV, written to
    /// `y (t × n_heads·head_dim)`; one work item per (chunk, kv-head).
    fn attention(
        &self,
        cfg: &ModelConfig,
        chunks: &[RawChunk<'_>],
        offs: &[usize],
        li: usize,
        qkv: &[f32],
        y: &mut [f32],
    ) {
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let groups = nh / nkv;
        let (qd, kvd) = (nh * hd, nkv * hd);
        let qkv_w = qd + 2 * kvd;
        let scale = 1.0 / (hd as f32).sqrt();
        let items: Vec<(usize, usize)> = (0..chunks.len())
            .flat_map(|c| (0..nkv).map(move |g| (c, g)))
            .collect();
        let out = SyncPtr(y.as_mut_ptr());
        let work = |&(ci, g): &(usize, usize)| {
            let c = &chunks[ci];
            let kv = &c.kv[li];
            let total = c.past + c.tokens.len();
            let mut scores = vec![0f32; total];
            let mut acc = vec![0f32; hd];
            for i in 0..c.tokens.len() {
                let row = offs[ci] + i;
                let visible = c.past + i + 1;
                for qh in g * groups..(g + 1) * groups {
                    let q = &qkv[row * qkv_w + qh * hd..row * qkv_w + (qh + 1) * hd];
                    let mut max = f32::NEG_INFINITY;
                    for (j, s) in scores[..visible].iter_mut().enumerate() {
                        let k = &kv.k[j * kvd + g * hd..j * kvd + (g + 1) * hd];
                        *s = dot_f32(q, k) * scale;
                        max = max.max(*s);
                    }
                    let mut sum = 0f32;
                    for s in scores[..visible].iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    acc.fill(0.0);
                    for (j, &p) in scores[..visible].iter().enumerate() {
                        let v = &kv.v[j * kvd + g * hd..j * kvd + (g + 1) * hd];
                        for (a, &vv) in acc.iter_mut().zip(v) {
                            *a += p * vv;
                        }
                    }
                    let inv = 1.0 / sum;
                    // SAFETY: (row, qh) is written by this work item only.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(out.get().add(row * qd + qh * hd), hd)
                    };
                    for (d, a) in dst.iter_mut().zip(&acc) {
                        *d = a * inv;
                    }
                }
            }
        };
        let cost: usize = chunks
            .iter()
            .map(|c| c.tokens.len() * (c.past + c.tokens.len()))
            .sum();
        if items.len() > 1 && cost * nh * hd > 1 << 16 {
            items.par_iter().for_each(work);
        } else {
            items.iter().for_each(work);
        }
    }
}
