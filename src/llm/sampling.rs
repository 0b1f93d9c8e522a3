//! Next-token selection per request: greedy argmax or temperature sampling with
//! top-k / top-p, drawing from the request's own seeded RNG so a rollout's text
//! never depends on which other requests share its batch.
//!
//! Temperature sampling sorts only the candidates that can matter: tokens whose
//! scaled logit is within [`CUTOFF`] of the best (each below it has under
//! e⁻³⁰ ≈ 1e-13 of the top token's probability, so all of them together stay
//! below the f32 resolution of the total), and at most `top_k` of those chosen
//! by selection, not a sort of the whole vocabulary (a 152k-entry sort per
//! token was most of an evaluation's time at temperature 0.7).

use super::Sampling;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Index of the largest logit (lowest index on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut bv = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > bv {
            bv = v;
            best = i;
        }
    }
    best as u32
}

/// Scaled-logit distance below the best token beyond which tokens are dropped.
pub const CUTOFF: f32 = 30.0;

/// Choose the next token from one row of logits.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    if s.is_greedy() || logits.is_empty() {
        return argmax(logits);
    }
    let t = s.temperature as f32;
    let best = logits
        .iter()
        .filter(|v| v.is_finite())
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v / t));
    if !best.is_finite() {
        return argmax(logits);
    }
    let mut idx: Vec<(usize, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite())
        .map(|(i, &v)| (i, v / t))
        .filter(|&(_, v)| v >= best - CUTOFF)
        .collect();
    // Descending by logit, ties by index, so the order is deterministic.
    let order = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if s.top_k > 0 && idx.len() > s.top_k {
        idx.select_nth_unstable_by(s.top_k - 1, order);
        idx.truncate(s.top_k);
    }
    idx.sort_by(order);
    let max = idx[0].1;
    let mut probs: Vec<f32> = idx.iter().map(|(_, v)| (v - max).exp()).collect();
    let sum: f32 = probs.iter().sum();
    for p in probs.iter_mut() {
        *p /= sum;
    }
    if s.top_p > 0.0 && s.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= s.top_p as f32 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let sum: f32 = probs.iter().sum();
        for p in probs.iter_mut() {
            *p /= sum;
        }
    }
    let u: f32 = rng.random::<f32>();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return idx[i].0 as u32;
        }
    }
    idx[probs.len() - 1].0 as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn greedy_and_topk() {
        let l = [0.1, 3.0, 2.0, -1.0];
        let mut r = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(sample(&l, &Sampling::greedy(), &mut r), 1);
        let s = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 1,
        };
        for _ in 0..20 {
            assert_eq!(sample(&l, &s, &mut r), 1);
        }
        let s = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 2,
        };
        let mut seen = [0; 4];
        for _ in 0..200 {
            seen[sample(&l, &s, &mut r) as usize] += 1;
        }
        assert!(seen[1] > 0 && seen[2] > 0 && seen[0] == 0 && seen[3] == 0);
    }

    #[test]
    fn far_tokens_are_dropped_but_the_distribution_is_kept() {
        // A 152k vocabulary with a few plausible tokens: draws match their
        // probabilities, and a token 40 logits below the best is never drawn.
        let mut l = vec![-40.0f32; 151_936];
        l[10] = 2.0;
        l[20] = 1.0;
        l[30] = 0.0;
        let s = Sampling::temperature(1.0);
        let mut r = ChaCha8Rng::seed_from_u64(3);
        let mut seen = std::collections::HashMap::new();
        for _ in 0..1500 {
            *seen.entry(sample(&l, &s, &mut r)).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
        let p10 = seen[&10] as f64 / 1500.0;
        let want = 1.0 / (1.0 + (-1f64).exp() + (-2f64).exp());
        assert!((p10 - want).abs() < 0.05, "{p10} vs {want}");
        // top-k by selection keeps the k best.
        let s = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 2,
        };
        for _ in 0..200 {
            assert!([10, 20].contains(&sample(&l, &s, &mut r)));
        }
    }

    #[test]
    fn same_seed_same_draws() {
        let l: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let s = Sampling::temperature(0.8);
        let a: Vec<u32> = {
            let mut r = ChaCha8Rng::seed_from_u64(7);
            (0..30).map(|_| sample(&l, &s, &mut r)).collect()
        };
        let b: Vec<u32> = {
            let mut r = ChaCha8Rng::seed_from_u64(7);
            (0..30).map(|_| sample(&l, &s, &mut r)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().any(|&x| x != a[0]));
    }
}
