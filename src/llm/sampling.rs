//! Next-token selection per request: greedy argmax or temperature sampling with
//! top-k / top-p, drawing from the request's own seeded RNG so a rollout's text
//! never depends on which other requests share its batch.

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

/// Choose the next token from one row of logits.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    if s.is_greedy() || logits.is_empty() {
        return argmax(logits);
    }
    let t = s.temperature as f32;
    let mut idx: Vec<(usize, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite())
        .map(|(i, &v)| (i, v / t))
        .collect();
    if idx.is_empty() {
        return argmax(logits);
    }
    // Sort descending by logit (stable on index for determinism).
    idx.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if s.top_k > 0 && idx.len() > s.top_k {
        idx.truncate(s.top_k);
    }
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
