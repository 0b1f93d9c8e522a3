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
use super::team::{self, SharedMut};

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

/// Rows per part for row-wise ops split over the team (small ops stay serial).
fn min_rows(row_len: usize) -> usize {
    (1usize << 15).div_ceil(row_len.max(1))
}

fn add_into(x: &mut [f32], o: &[f32]) {
    let xs = SharedMut::new(x);
    team::for_ranges(o.len(), 1 << 15, &|r| {
        // SAFETY: ranges are disjoint.
        let x = unsafe { xs.range(r.start, r.end) };
        for (a, b) in x.iter_mut().zip(&o[r]) {
            *a += b;
        }
    });
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    let outs = SharedMut::new(out);
    team::for_ranges(x.len() / h, min_rows(h), &|rows| {
        // SAFETY: row ranges are disjoint.
        let out = unsafe { outs.range(rows.start * h, rows.end * h) };
        let xs = &x[rows.start * h..rows.end * h];
        for (xr, or) in xs.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
            let ss: f32 = xr.iter().map(|v| v * v).sum();
            let scale = 1.0 / (ss / h as f32 + eps).sqrt();
            for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
                *o = v * scale * g;
            }
        }
    });
}

/// `act = silu(gate) · up` per row of `gu = [gate | up]`.
fn silu_mul(gu: &[f32], act: &mut [f32], inter: usize) {
    let acts = SharedMut::new(act);
    team::for_ranges(gu.len() / (2 * inter).max(1), min_rows(inter), &|rows| {
        // SAFETY: row ranges are disjoint.
        let act = unsafe { acts.range(rows.start * inter, rows.end * inter) };
        let g = &gu[rows.start * 2 * inter..rows.end * 2 * inter];
        for (g, a) in g.chunks_exact(2 * inter).zip(act.chunks_exact_mut(inter)) {
            let (gate, up) = g.split_at(inter);
            for ((a, &g), &u) in a.iter_mut().zip(gate).zip(up) {
                *a = g / (1.0 + (-g).exp()) * u;
            }
        }
    });
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
    let mut s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// [`dot_f32`] with AVX2 registers: the same lanes and sum order, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        let x = _mm256_loadu_ps(a.as_ptr().add(i));
        let y = _mm256_loadu_ps(b.as_ptr().add(i));
        acc = _mm256_add_ps(acc, _mm256_mul_ps(x, y));
        i += 8;
    }
    let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let mut s = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)));
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

/// Four [`dot_f32_avx2`]s of `a` with `b[0..4]` at once: four independent
/// accumulator chains instead of one latency-bound chain, each result the
/// same bits as its own call (same lanes, same sum order).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn dot4_f32_avx2(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let n = b.iter().fold(a.len(), |n, b| n.min(b.len()));
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 8 <= n {
        let x = _mm256_loadu_ps(a.as_ptr().add(i));
        for (acc, b) in acc.iter_mut().zip(&b) {
            *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, _mm256_loadu_ps(b.as_ptr().add(i))));
        }
        i += 8;
    }
    let mut out = [0f32; 4];
    for ((o, acc), b) in out.iter_mut().zip(acc).zip(&b) {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let mut s = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)));
        for t in i..n {
            s += a[t] * b[t];
        }
        *o = s;
    }
    out
}

/// `acc += p[0]·v[0]`, then `p[1]·v[1]`, … `p[3]·v[3]`, element-wise in
/// that order (the same bits as four [`axpy_avx2`] calls), with `acc`
/// loaded and stored once instead of four times.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn axpy4_avx2(acc: &mut [f32], p: [f32; 4], v: [&[f32]; 4]) {
    use std::arch::x86_64::*;
    let n = v.iter().fold(acc.len(), |n, v| n.min(v.len()));
    let pv = p.map(|p| _mm256_set1_ps(p));
    let mut i = 0;
    while i + 8 <= n {
        let mut a = _mm256_loadu_ps(acc.as_ptr().add(i));
        for (pv, v) in pv.iter().zip(&v) {
            a = _mm256_add_ps(a, _mm256_mul_ps(*pv, _mm256_loadu_ps(v.as_ptr().add(i))));
        }
        _mm256_storeu_ps(acc.as_mut_ptr().add(i), a);
        i += 8;
    }
    for t in i..n {
        for (p, v) in p.iter().zip(&v) {
            acc[t] += p * v[t];
        }
    }
}

/// `acc += p · v` (AVX2 registers; element-wise, so the same bits as the plain loop).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn axpy_avx2(acc: &mut [f32], p: f32, v: &[f32]) {
    use std::arch::x86_64::*;
    let n = acc.len().min(v.len());
    let pv = _mm256_set1_ps(p);
    let mut i = 0;
    while i + 8 <= n {
        let a = _mm256_loadu_ps(acc.as_ptr().add(i));
        let x = _mm256_loadu_ps(v.as_ptr().add(i));
        _mm256_storeu_ps(
            acc.as_mut_ptr().add(i),
            _mm256_add_ps(a, _mm256_mul_ps(pv, x)),
        );
        i += 8;
    }
    while i < n {
        acc[i] += p * v[i];
        i += 1;
    }
}

#[inline(always)]
fn axpy(acc: &mut [f32], p: f32, v: &[f32]) {
    for (a, &x) in acc.iter_mut().zip(v) {
        *a += p * x;
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

    /// Use another kernel tier (ignored unless this CPU supports it).
    pub fn set_tier(&mut self, tier: Tier) {
        if tier.supported() {
            self.tier = tier;
        }
    }

    /// Bytes of weights read per forward: every layer's matmuls and the output
    /// head (the embedding only when it is the tied head).
    pub fn streamed_weight_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| l.qkv.bytes() + l.wo.bytes() + l.gate_up.bytes() + l.down.bytes())
            .sum();
        l + self.lm_head.as_ref().unwrap_or(&self.embed).bytes()
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
            time(Phase::Elementwise, || silu_mul(&gu, &mut act, inter));
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
        time(Phase::Matmul, || {
            matmul(tier, head, &acts, &mut logits, vocab)
        });
        logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect()
    }

    /// Causal attention of each chunk's new tokens over its whole KV, written to
    /// `y (t × n_heads·head_dim)`; one work item per (chunk, kv-head, range of up
    /// to 32 new tokens), each reading its K/V rows once for the whole GQA group.
    fn attention(
        &self,
        cfg: &ModelConfig,
        chunks: &[RawChunk<'_>],
        offs: &[usize],
        li: usize,
        qkv: &[f32],
        y: &mut [f32],
    ) {
        const RANGE: usize = 32;
        let nkv = cfg.n_kv_heads;
        let mut items = Vec::new();
        for (ci, c) in chunks.iter().enumerate() {
            for g in 0..nkv {
                for i0 in (0..c.tokens.len()).step_by(RANGE) {
                    items.push((ci, g, i0, (i0 + RANGE).min(c.tokens.len())));
                }
            }
        }
        let out = SharedMut::new(y);
        let tier = self.tier;
        let work = |&(ci, g, i0, i1): &(usize, usize, usize, usize)| {
            let c = &chunks[ci];
            let job = AttnJob {
                cfg,
                kv: &c.kv[li],
                past: c.past,
                g,
                rows: (offs[ci] + i0, i1 - i0, i0),
                qkv,
            };
            // SAFETY: rows offs[ci]+i0..offs[ci]+i1 of kv-head g's q-heads are
            // written by this work item only.
            unsafe { job.run(tier, &out) };
        };
        let cost: usize = chunks
            .iter()
            .map(|c| c.tokens.len() * (c.past + c.tokens.len()))
            .sum();
        if items.len() > 1 && cost * cfg.n_heads * cfg.head_dim > 1 << 16 {
            team::run(items.len(), &|i| work(&items[i]));
        } else {
            items.iter().for_each(work);
        }
    }
}

/// One attention work item: new tokens `rows = (first packed row, count, index
/// of the first in its chunk)` of one chunk, for the q-heads of kv-head `g`.
struct AttnJob<'a> {
    cfg: &'a ModelConfig,
    kv: &'a RawKv,
    past: usize,
    g: usize,
    rows: (usize, usize, usize),
    qkv: &'a [f32],
}

impl AttnJob<'_> {
    /// Run with the widest f32 code generation the tier allows (same bits: no
    /// fused multiply-add, same operation order).
    unsafe fn run(&self, tier: Tier, out: &SharedMut<f32>) {
        #[cfg(target_arch = "x86_64")]
        if tier.has_avx2() {
            return self.run_avx2(out);
        }
        let _ = tier;
        self.body::<false>(out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, out: &SharedMut<f32>) {
        self.body::<true>(out)
    }

    #[inline(always)]
    unsafe fn body<const AVX2: bool>(&self, out: &SharedMut<f32>) {
        let dot = |a: &[f32], b: &[f32]| {
            #[cfg(target_arch = "x86_64")]
            if AVX2 {
                return dot_f32_avx2(a, b);
            }
            dot_f32(a, b)
        };
        let axpy = |acc: &mut [f32], p: f32, v: &[f32]| {
            #[cfg(target_arch = "x86_64")]
            if AVX2 {
                return axpy_avx2(acc, p, v);
            }
            axpy(acc, p, v)
        };
        let cfg = self.cfg;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let groups = nh / nkv;
        let (qd, kvd) = (nh * hd, nkv * hd);
        let qkv_w = qd + 2 * kvd;
        let scale = 1.0 / (hd as f32).sqrt();
        let (row0, n, first) = self.rows;
        let total = self.past + first + n;
        let g = self.g;
        let mut scores = vec![0f32; groups * total];
        let mut acc = vec![0f32; groups * hd];
        let mut inv = vec![0f32; groups];
        for i in 0..n {
            let row = row0 + i;
            let visible = self.past + first + i + 1;
            let q = &self.qkv[row * qkv_w + g * groups * hd..row * qkv_w + (g + 1) * groups * hd];
            let kr = |j: usize| &self.kv.k[j * kvd + g * hd..j * kvd + (g + 1) * hd];
            let mut j0 = 0;
            #[cfg(target_arch = "x86_64")]
            if AVX2 {
                // Four keys at a time: independent chains, the same bits.
                while j0 + 4 <= visible {
                    let ks = [kr(j0), kr(j0 + 1), kr(j0 + 2), kr(j0 + 3)];
                    for h in 0..groups {
                        let r = dot4_f32_avx2(&q[h * hd..(h + 1) * hd], ks);
                        for (u, r) in r.into_iter().enumerate() {
                            scores[h * total + j0 + u] = r * scale;
                        }
                    }
                    j0 += 4;
                }
            }
            for j in j0..visible {
                let k = kr(j);
                for h in 0..groups {
                    scores[h * total + j] = dot(&q[h * hd..(h + 1) * hd], k) * scale;
                }
            }
            for h in 0..groups {
                let s = &mut scores[h * total..h * total + visible];
                let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let mut sum = 0f32;
                for v in s.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                inv[h] = 1.0 / sum;
            }
            acc.fill(0.0);
            let vr = |j: usize| &self.kv.v[j * kvd + g * hd..j * kvd + (g + 1) * hd];
            let mut j0 = 0;
            #[cfg(target_arch = "x86_64")]
            if AVX2 {
                while j0 + 4 <= visible {
                    let vs = [vr(j0), vr(j0 + 1), vr(j0 + 2), vr(j0 + 3)];
                    for h in 0..groups {
                        let p = std::array::from_fn(|u| scores[h * total + j0 + u]);
                        axpy4_avx2(&mut acc[h * hd..(h + 1) * hd], p, vs);
                    }
                    j0 += 4;
                }
            }
            for j in j0..visible {
                let v = vr(j);
                for h in 0..groups {
                    axpy(&mut acc[h * hd..(h + 1) * hd], scores[h * total + j], v);
                }
            }
            for h in 0..groups {
                let qh = g * groups + h;
                let dst = out.range(row * qd + qh * hd, row * qd + (qh + 1) * hd);
                for (d, a) in dst.iter_mut().zip(&acc[h * hd..(h + 1) * hd]) {
                    *d = a * inv[h];
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn vecs(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<Vec<f32>> {
        (0..5)
            .map(|_| (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect())
            .collect()
    }

    #[test]
    fn four_way_attention_steps_have_the_bits_of_one_at_a_time() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        // Head sizes with and without a tail past the last 8 lanes.
        for n in [64, 128, 13, 3] {
            let v = vecs(&mut rng, n);
            let b = [&v[1][..], &v[2][..], &v[3][..], &v[4][..]];
            // SAFETY: AVX2 checked above.
            let four = unsafe { dot4_f32_avx2(&v[0], b) };
            for (f, b) in four.iter().zip(b) {
                assert_eq!(f.to_bits(), dot_f32(&v[0], b).to_bits(), "dot, n {n}");
            }
            let p = [0.25f32, -1.5, 0.1, 3.0];
            let (mut one, mut all) = (v[0].clone(), v[0].clone());
            for (p, b) in p.iter().zip(b) {
                axpy(&mut one, *p, b);
            }
            // SAFETY: as above.
            unsafe { axpy4_avx2(&mut all, p, b) };
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one), bits(&all), "axpy, n {n}");
        }
    }
}
