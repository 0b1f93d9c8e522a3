//! Experimental designs of a round: which joint configurations run on the
//! block, and how per-agent credits follow from their scores.
//!
//! * [`Design::Joint`] (the paper, §3): configuration `i` sets candidate `i`
//!   of *every* agent at once (the incumbent first). Few configurations, but a
//!   score difference cannot be separated between the agents that changed by
//!   anything that only sees scores: the attributer LLM has to split it —
//!   by crediting every agent directly (the paper), or, with `joint_split`,
//!   by dividing the observed score difference between the changed agents
//!   ([`split_credits`]).
//! * [`Design::Ofat`] (one factor at a time; not in the paper): every
//!   configuration changes *one* agent around the incumbent, so
//!   `score(config, q) − score(incumbent, q)` is an exact counterfactual
//!   credit of that agent's candidate on query `q` ([`counterfactual_credits`]).
//!   It costs more rollouts (Σ candidates instead of max), bounded by a cap
//!   per agent. Where the scores tie (the common case with 0/1 scores), the
//!   attributer's judgement of the two rollouts may refine the credit with a
//!   small weight ([`tie_refinement`]), so a real score difference always
//!   dominates.
//!
//! Degenerate attributions (every agent credited the same in a group whose
//! scores differ: the attributer saw no difference) are detected by
//! [`is_degenerate`]; the round loop replaces them by the identity credit
//! (`2·score − 1` for every agent), so a blind attributer degrades CANTANTE
//! to the identity ablation rather than to noise.

use crate::attribution::AgentCredits;
use crate::graph::PromptSet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How a round's joint configurations are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Design {
    /// Candidate `i` of every agent together (the paper's design).
    #[default]
    Joint,
    /// One agent changed at a time around the incumbent (exact counterfactuals).
    Ofat,
}

impl std::str::FromStr for Design {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "joint" => Ok(Self::Joint),
            "ofat" => Ok(Self::Ofat),
            _ => Err(format!("unknown design `{s}` (expected joint or ofat)")),
        }
    }
}

impl std::fmt::Display for Design {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Design::Joint => "joint",
            Design::Ofat => "ofat",
        })
    }
}

/// One planned configuration and the agents whose prompt differs from the
/// incumbent's (empty for the incumbent itself).
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    /// The joint configuration.
    pub config: PromptSet,
    /// Agents changed relative to the incumbent.
    pub changed: Vec<String>,
}

fn changed_agents(incumbent: &PromptSet, c: &PromptSet) -> Vec<String> {
    c.iter()
        .filter(|(a, p)| incumbent.get(*a) != Some(*p))
        .map(|(a, _)| a.clone())
        .collect()
}

/// The configurations of a round, incumbent first, without duplicates.
/// `lists` holds each agent's candidates in this round's (shuffled) order.
/// For [`Design::Ofat`], at most `cap` candidates per agent other than its
/// incumbent prompt are run (the first ones of its list); `None` = all.
pub fn plan(
    design: Design,
    incumbent: &PromptSet,
    lists: &[(String, Vec<String>)],
    cap: Option<usize>,
) -> Vec<Planned> {
    let mut configs = vec![incumbent.clone()];
    match design {
        Design::Joint => {
            let m = lists.iter().map(|l| l.1.len()).max().unwrap_or(0);
            for i in 0..m {
                let mut c = incumbent.clone();
                for (a, list) in lists {
                    if let Some(p) = list.get(i) {
                        c.insert(a.clone(), p.clone());
                    }
                }
                if !configs.contains(&c) {
                    configs.push(c);
                }
            }
        }
        Design::Ofat => {
            for (a, list) in lists {
                let others = list.iter().filter(|p| incumbent.get(a) != Some(*p));
                for p in others.take(cap.unwrap_or(usize::MAX)) {
                    let mut c = incumbent.clone();
                    c.insert(a.clone(), p.clone());
                    if !configs.contains(&c) {
                        configs.push(c);
                    }
                }
            }
        }
    }
    configs
        .into_iter()
        .map(|c| Planned {
            changed: changed_agents(incumbent, &c),
            config: c,
        })
        .collect()
}

/// One-factor-at-a-time configurations for `attribute`: the first
/// configuration is the reference; every agent prompt of the others that
/// differs from the reference's is swapped into it alone.
pub fn swaps(configs: &[PromptSet]) -> Vec<Planned> {
    let Some(reference) = configs.first() else {
        return Vec::new();
    };
    let lists: Vec<(String, Vec<String>)> = reference
        .keys()
        .map(|a| {
            let mut list: Vec<String> = Vec::new();
            for c in &configs[1..] {
                if let Some(p) = c.get(a) {
                    if !list.contains(p) {
                        list.push(p.clone());
                    }
                }
            }
            (a.clone(), list)
        })
        .collect();
    plan(Design::Ofat, reference, &lists, None)
}

/// `credits[agent][c][q]` of a design run: configuration 0 (the incumbent)
/// gets 0 for every agent; a configuration that changed exactly one agent
/// gives that agent `score[c][q] − score[0][q]` (clamped to [-1, 1]) and the
/// other agents nothing (they did not change); a configuration that changed
/// several agents gives nobody a counterfactual credit.
pub fn counterfactual_credits(
    agents: &[String],
    planned: &[Planned],
    scores: &[Vec<f64>],
) -> BTreeMap<String, Vec<Vec<Option<f64>>>> {
    let nq = scores.first().map_or(0, Vec::len);
    agents
        .iter()
        .map(|a| {
            let m = planned
                .iter()
                .zip(scores)
                .enumerate()
                .map(|(c, (p, row))| {
                    (0..nq)
                        .map(|q| {
                            if c == 0 {
                                Some(0.0)
                            } else if p.changed.len() == 1 && &p.changed[0] == a {
                                let d = row[q] - scores[0][q];
                                d.is_finite().then(|| d.clamp(-1.0, 1.0))
                            } else {
                                None
                            }
                        })
                        .collect()
                })
                .collect();
            (a.clone(), m)
        })
        .collect()
}

/// The refinement of a tied counterfactual credit from the attributer's
/// credits of the agent in the candidate's and the incumbent's rollout:
/// `weight · (candidate − incumbent) / 2`, so it stays within ±`weight`
/// (below any real score difference when `weight < 1`). `None` when either
/// credit is missing.
pub fn tie_refinement(candidate: Option<f64>, incumbent: Option<f64>, weight: f64) -> Option<f64> {
    Some(weight * (candidate? - incumbent?) / 2.0)
}

/// Whether an attributed group is degenerate: its scores differ, at least one
/// agent got two or more credits, and every agent's non-missing credits are
/// all equal (the attributer credited everyone the same whatever happened).
pub fn is_degenerate(scores: &[f64], credits: &[AgentCredits]) -> bool {
    let lo = scores.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !(hi - lo > 1e-9) {
        return false;
    }
    let mut agents: BTreeMap<&String, Vec<f64>> = BTreeMap::new();
    for rc in credits {
        for (a, v) in rc {
            if let Some(x) = v {
                agents.entry(a).or_default().push(*x);
            }
        }
    }
    let mut informative = false;
    for vals in agents.values() {
        if vals.len() >= 2 {
            informative = true;
            if vals.iter().any(|v| (v - vals[0]).abs() > 1e-9) {
                return false;
            }
        }
    }
    informative
}

/// Score-anchored credits of a joint-design candidate rollout (the
/// `joint_split` option): the score difference `delta` to the incumbent on
/// the same query is split between the `changed` agents in proportion to how
/// much more the attributer credited each of them in the candidate's rollout
/// than in the incumbent's (only differences agreeing with the sign of
/// `delta` count; none → an equal split), so the credits sum to the observed
/// difference whatever the attributer says. A tie (`delta` = 0) gives each
/// changed agent `tie_weight · (candidate − incumbent) / 2`. Agents that did
/// not change get no credit.
pub fn split_credits(
    changed: &[String],
    delta: f64,
    candidate: &AgentCredits,
    incumbent: &AgentCredits,
    tie_weight: f64,
) -> AgentCredits {
    let diff = |a: &String| {
        let get = |m: &AgentCredits| m.get(a).copied().flatten();
        match (get(candidate), get(incumbent)) {
            (Some(c), Some(i)) => c - i,
            _ => 0.0,
        }
    };
    if !delta.is_finite() {
        return changed.iter().map(|a| (a.clone(), None)).collect();
    }
    if delta == 0.0 {
        return changed
            .iter()
            .map(|a| (a.clone(), Some(tie_weight * diff(a) / 2.0)))
            .collect();
    }
    let w: Vec<f64> = changed
        .iter()
        .map(|a| (delta.signum() * diff(a)).max(0.0))
        .collect();
    let total: f64 = w.iter().sum();
    changed
        .iter()
        .zip(&w)
        .map(|(a, &wa)| {
            let share = if total > 0.0 {
                wa / total
            } else {
                1.0 / changed.len() as f64
            };
            (a.clone(), Some((delta * share).clamp(-1.0, 1.0)))
        })
        .collect()
}

/// The credits of an attributed group, with a degenerate group's
/// ([`is_degenerate`]) replaced by identity credits; the flag says whether
/// it was.
pub fn checked_credits(
    agents: &[String],
    scores: &[f64],
    credits: &[AgentCredits],
) -> (Vec<AgentCredits>, bool) {
    if is_degenerate(scores, credits) {
        let fallback = scores
            .iter()
            .map(|&s| identity_credits(agents, s))
            .collect();
        (fallback, true)
    } else {
        (credits.to_vec(), false)
    }
}

/// `scores[c][q]` of a rollout matrix.
pub fn score_matrix(rollouts: &[Vec<crate::attribution::Rollout>]) -> Vec<Vec<f64>> {
    rollouts
        .iter()
        .map(|row| row.iter().map(|r| r.score).collect())
        .collect()
}

/// The identity credits of a rollout (`2·score − 1` for every agent): the
/// fallback of a degenerate group.
pub fn identity_credits(agents: &[String], score: f64) -> AgentCredits {
    let c = score
        .is_finite()
        .then(|| (2.0 * score - 1.0).clamp(-1.0, 1.0));
    agents.iter().map(|a| (a.clone(), c)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ps(pairs: &[(&str, &str)]) -> PromptSet {
        pairs
            .iter()
            .map(|(a, p)| (a.to_string(), p.to_string()))
            .collect()
    }

    fn lists() -> Vec<(String, Vec<String>)> {
        vec![
            ("a".into(), vec!["a1".into(), "a0".into(), "a2".into()]),
            ("b".into(), vec!["b0".into(), "b1".into()]),
        ]
    }

    #[test]
    fn joint_changes_everyone_ofat_one_at_a_time() {
        let inc = ps(&[("a", "a0"), ("b", "b0")]);
        let joint = plan(Design::Joint, &inc, &lists(), None);
        let changed: Vec<Vec<String>> = joint.iter().map(|p| p.changed.clone()).collect();
        assert_eq!(
            changed,
            vec![
                vec![],
                vec!["a".to_string()],
                vec!["b".into()],
                vec!["a".into()]
            ]
        );
        assert_eq!(joint[2].config, ps(&[("a", "a0"), ("b", "b1")]));
        let ofat = plan(Design::Ofat, &inc, &lists(), None);
        assert_eq!(ofat.len(), 4);
        assert!(ofat[1..].iter().all(|p| p.changed.len() == 1));
        assert_eq!(ofat[3].config, ps(&[("a", "a0"), ("b", "b1")]));
        let capped = plan(Design::Ofat, &inc, &lists(), Some(1));
        assert_eq!(capped.len(), 3);
        assert_eq!(capped[1].config, ps(&[("a", "a1"), ("b", "b0")]));
    }

    #[test]
    fn swaps_put_each_differing_prompt_into_the_reference() {
        let c = [
            ps(&[("a", "a0"), ("b", "b0")]),
            ps(&[("a", "a1"), ("b", "b0")]),
            ps(&[("a", "a2"), ("b", "b2")]),
        ];
        let s = swaps(&c);
        let configs: Vec<PromptSet> = s.iter().map(|p| p.config.clone()).collect();
        assert_eq!(
            configs,
            vec![
                c[0].clone(),
                ps(&[("a", "a1"), ("b", "b0")]),
                ps(&[("a", "a2"), ("b", "b0")]),
                ps(&[("a", "a0"), ("b", "b2")]),
            ]
        );
    }

    #[test]
    fn counterfactual_credit_is_the_score_difference() {
        let inc = ps(&[("a", "a0"), ("b", "b0")]);
        let planned = plan(Design::Ofat, &inc, &lists(), None);
        let scores = vec![
            vec![1.0, 0.0],
            vec![0.0, 0.0],
            vec![1.0, 1.0],
            vec![1.0, 0.5],
        ];
        let agents = ["a".to_string(), "b".to_string()];
        let cr = counterfactual_credits(&agents, &planned, &scores);
        assert_eq!(cr["a"][0], vec![Some(0.0), Some(0.0)]);
        assert_eq!(cr["a"][1], vec![Some(-1.0), Some(0.0)]);
        assert_eq!(cr["a"][2], vec![Some(0.0), Some(1.0)]);
        assert_eq!(cr["a"][3], vec![None, None]);
        assert_eq!(cr["b"][1], vec![None, None]);
        assert_eq!(cr["b"][3], vec![Some(0.0), Some(0.5)]);
    }

    #[test]
    fn degenerate_groups_are_detected() {
        let same = |x: f64| -> AgentCredits {
            [("a".to_string(), Some(x)), ("b".to_string(), Some(x))].into()
        };
        assert!(is_degenerate(&[1.0, 0.0], &[same(0.0), same(0.0)]));
        assert!(!is_degenerate(&[1.0, 1.0], &[same(0.0), same(0.0)]));
        assert!(!is_degenerate(&[1.0, 0.0], &[same(0.5), same(0.0)]));
        let missing: AgentCredits = [("a".to_string(), None), ("b".to_string(), None)].into();
        assert!(!is_degenerate(&[1.0, 0.0], &[missing.clone(), missing]));
        assert_eq!(tie_refinement(Some(1.0), Some(-1.0), 0.25), Some(0.25));
        assert_eq!(tie_refinement(None, Some(0.0), 0.25), None);
        assert_eq!(
            identity_credits(&["a".into()], 1.0),
            [("a".to_string(), Some(1.0))].into()
        );
    }

    #[test]
    fn split_credits_sum_to_the_score_difference() {
        let m = |a: f64, b: f64| -> AgentCredits {
            [("a".to_string(), Some(a)), ("b".to_string(), Some(b))].into()
        };
        let changed = ["a".to_string(), "b".to_string()];
        // The attributer saw a improve by 0.6 and b by 0.2: a gets 3/4 of the gain.
        let s = split_credits(&changed, 1.0, &m(0.8, 0.2), &m(0.2, 0.0), 0.25);
        assert!((s["a"].unwrap() - 0.75).abs() < 1e-12 && (s["b"].unwrap() - 0.25).abs() < 1e-12);
        // A loss goes to the agent that got worse; a blind attributer splits evenly.
        let s = split_credits(&changed, -1.0, &m(0.0, -0.5), &m(0.0, 0.0), 0.25);
        assert_eq!((s["a"], s["b"]), (Some(-0.0), Some(-1.0)));
        let s = split_credits(&changed, 1.0, &m(0.0, 0.0), &m(0.0, 0.0), 0.25);
        assert_eq!((s["a"], s["b"]), (Some(0.5), Some(0.5)));
        // Ties: weighted difference; an unchanged agent gets nothing.
        let s = split_credits(&changed[..1], 0.0, &m(1.0, 0.0), &m(-1.0, 0.0), 0.25);
        assert_eq!(s.len(), 1);
        assert_eq!(s["a"], Some(0.25));
    }
}
