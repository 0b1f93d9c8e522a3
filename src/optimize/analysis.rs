//! Credit-correlation analysis (spec §9.5): per agent, Spearman's ρ between
//! the agent's mean credit in an evaluated joint configuration and that
//! configuration's block-mean system score, over the records of
//! `rounds.jsonl`. Unlike the reference's figure, it uses every evaluated
//! configuration with its own per-query credits (no population look-up).
//! A moderate, agent-specific ρ indicates credits that are not just an echo of
//! the system score; it does not show that credits are correct. For that,
//! [`counterfactual_correlation`] compares credits with the measured gain of
//! configurations that changed a single agent. [`candidate_outcomes`] counts,
//! per changed agent, the block queries on which a candidate configuration
//! solved what the incumbent missed (or the reverse): when it finds no win,
//! no selection rule can find a better prompt in the run.

use super::RoundRecord;
use std::collections::BTreeMap;

/// Ranks with ties averaged (1-based).
pub fn ranks(values: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| {
        values[a]
            .partial_cmp(&values[b])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut r = vec![0.0; values.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && values[idx[j + 1]] == values[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            r[idx[k]] = avg;
        }
        i = j + 1;
    }
    r
}

/// Spearman's ρ (Pearson correlation of tie-averaged ranks); `None` with
/// fewer than 3 pairs or a constant variable.
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len().min(y.len());
    if n < 3 {
        return None;
    }
    let (rx, ry) = (ranks(&x[..n]), ranks(&y[..n]));
    let mx = rx.iter().sum::<f64>() / n as f64;
    let my = ry.iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (dx, dy) = (rx[i] - mx, ry[i] - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if sxx <= 0.0 || syy <= 0.0 {
        None
    } else {
        Some(sxy / (sxx * syy).sqrt())
    }
}

/// Per agent: (Spearman ρ of the (x, y) points, number of points).
fn rho_per_agent(
    points: BTreeMap<String, (Vec<f64>, Vec<f64>)>,
) -> BTreeMap<String, (Option<f64>, usize)> {
    points
        .into_iter()
        .map(|(a, (x, y))| {
            let n = x.len();
            (a, (spearman(&x, &y), n))
        })
        .collect()
}

/// Per agent: (ρ, number of configurations used). Configurations where the
/// agent has no non-missing credit are skipped.
pub fn credit_correlation(records: &[RoundRecord]) -> BTreeMap<String, (Option<f64>, usize)> {
    let mut points: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for rec in records {
        for (agent, per_config) in &rec.credits {
            for (c, row) in per_config.iter().enumerate() {
                let vals: Vec<f64> = row.iter().flatten().copied().collect();
                let (Some(score), false) = (rec.block_scores.get(c), vals.is_empty()) else {
                    continue;
                };
                let e = points.entry(agent.clone()).or_default();
                e.0.push(vals.iter().sum::<f64>() / vals.len() as f64);
                e.1.push(*score);
            }
        }
    }
    rho_per_agent(points)
}

/// Per agent: (ρ, configurations used) between the agent's mean credit in a
/// configuration that changed *only that agent* relative to the round's
/// incumbent and that configuration's counterfactual gain (its block score
/// minus the incumbent's). Such configurations are what the `ofat` design
/// runs; the joint design has them only when other agents ran out of
/// candidates, so there n is usually 0 (undefined ρ). Under `ofat` without
/// tie refinement the credit *is* the gain (ρ = 1); with refinement it
/// checks that refined ties do not reorder real gains.
pub fn counterfactual_correlation(
    records: &[RoundRecord],
) -> BTreeMap<String, (Option<f64>, usize)> {
    let mut points: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for rec in records {
        let Some(&base) = rec.block_scores.first() else {
            continue;
        };
        for (c, changed) in rec.changed.iter().enumerate().skip(1) {
            let ([agent], Some(score)) = (changed.as_slice(), rec.block_scores.get(c)) else {
                continue;
            };
            let Some(row) = rec.credits.get(agent).and_then(|m| m.get(c)) else {
                continue;
            };
            let vals: Vec<f64> = row.iter().flatten().copied().collect();
            if vals.is_empty() {
                continue;
            }
            let e = points.entry(agent.clone()).or_default();
            e.0.push(vals.iter().sum::<f64>() / vals.len() as f64);
            e.1.push(score - base);
        }
    }
    rho_per_agent(points)
}

/// Per-query comparison of candidate configurations with the incumbent
/// (configuration 0) of the same round, on the same block queries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Outcomes {
    /// Candidate configurations compared.
    pub configs: usize,
    /// Queries where the candidate scored higher than the incumbent.
    pub won: usize,
    /// Queries where it scored lower.
    pub lost: usize,
    /// Queries where both scored the same.
    pub tied: usize,
}

/// Key of [`candidate_outcomes`] for configurations that changed more than one agent.
pub const SEVERAL_AGENTS: &str = "(several agents)";

/// Candidate-vs-incumbent outcomes over every round, keyed by the agent a
/// configuration changed ([`SEVERAL_AGENTS`] when it changed more than one,
/// as in the joint design). Records without `changed` (older runs)
/// contribute nothing. Scores differing by less than 1e-9 tie.
pub fn candidate_outcomes(records: &[RoundRecord]) -> BTreeMap<String, Outcomes> {
    let mut out: BTreeMap<String, Outcomes> = BTreeMap::new();
    for rec in records {
        let Some(base) = rec.scores.first() else {
            continue;
        };
        for (c, changed) in rec.changed.iter().enumerate().skip(1) {
            let Some(row) = rec.scores.get(c).filter(|_| !changed.is_empty()) else {
                continue;
            };
            let key = match changed.as_slice() {
                [agent] => agent.clone(),
                _ => SEVERAL_AGENTS.to_string(),
            };
            let e = out.entry(key).or_default();
            e.configs += 1;
            for (cand, inc) in row.iter().zip(base) {
                match cand - inc {
                    d if d > 1e-9 => e.won += 1,
                    d if d < -1e-9 => e.lost += 1,
                    _ => e.tied += 1,
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_average_ties() {
        assert_eq!(ranks(&[10.0, 20.0, 10.0, 30.0]), vec![1.5, 3.0, 1.5, 4.0]);
    }

    #[test]
    fn spearman_known_values() {
        // Monotone -> 1; reversed -> -1.
        assert_eq!(
            spearman(&[1.0, 2.0, 3.0, 4.0], &[10.0, 20.0, 35.0, 90.0]),
            Some(1.0)
        );
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        // x = 1..5, y = [2,1,4,3,5]: d^2 = 1+1+1+1+0 = 4, rho = 1 - 6*4/(5*24) = 0.8
        let r = spearman(&[1.0, 2.0, 3.0, 4.0, 5.0], &[2.0, 1.0, 4.0, 3.0, 5.0]).unwrap();
        assert!((r - 0.8).abs() < 1e-12);
        assert_eq!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
        assert_eq!(spearman(&[1.0, 2.0], &[1.0, 2.0]), None);
    }

    /// A round with per-query `scores` and the agents each configuration changed.
    fn round(scores: Vec<Vec<f64>>, changed: Vec<Vec<&str>>) -> RoundRecord {
        let n = scores.len();
        let block_scores: Vec<f64> = scores
            .iter()
            .map(|r| r.iter().sum::<f64>() / r.len() as f64)
            .collect();
        let j = serde_json::json!({
            "round": 1, "configs": vec![serde_json::json!({}); n], "config_hashes": vec!["h"; n],
            "changed": changed, "block": [0, 1, 2], "scores": scores, "block_scores": block_scores,
            "credits": {}, "attribution_failures": 0, "rejections": {}, "task_tokens": 0,
            "meta_tokens": 0, "tokens": super::super::TokenCounters::default(), "incumbent": {},
            "validation_score": 0.0,
        });
        serde_json::from_value(j).expect("a RoundRecord")
    }

    #[test]
    fn candidate_outcomes_count_flips_per_changed_agent() {
        let r1 = round(
            vec![
                vec![1.0, 0.0, 0.0],
                vec![1.0, 1.0, 0.0], // a: one win, two ties
                vec![0.0, 0.0, 0.0], // b: one loss
                vec![0.5, 0.0, 1.0], // a and b: a loss (partial score) and a win
            ],
            vec![vec![], vec!["a"], vec!["b"], vec!["a", "b"]],
        );
        let r2 = round(
            vec![vec![0.0, 1.0, 1.0], vec![0.0, 1.0, 1.0]],
            vec![vec![], vec!["a"]],
        );
        let out = candidate_outcomes(&[r1, r2]);
        assert_eq!(
            out["a"],
            Outcomes {
                configs: 2,
                won: 1,
                lost: 0,
                tied: 5
            }
        );
        assert_eq!(
            out["b"],
            Outcomes {
                configs: 1,
                won: 0,
                lost: 1,
                tied: 2
            }
        );
        assert_eq!(
            out[SEVERAL_AGENTS],
            Outcomes {
                configs: 1,
                won: 1,
                lost: 1,
                tied: 1
            }
        );
        // Records without `changed` (older runs) count nothing.
        let mut old = round(vec![vec![0.0], vec![1.0]], vec![vec![], vec!["a"]]);
        old.changed.clear();
        assert!(candidate_outcomes(&[old]).is_empty());
    }
}
