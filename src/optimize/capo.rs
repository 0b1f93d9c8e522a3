//! CAPO per agent, raced on attributed credits (spec §4.4, promptolution 2.2.2
//! CAPO with CANTANTE's settings), spread over synchronous rounds.
//!
//! One CAPO step = one race: `crossovers_per_round` crossovers of two distinct
//! parents drawn (seeded) from the population, each child then mutated; the
//! race set is population ∪ mutants. Every round evaluates the race set on that
//! round's block (one block per round), then eliminates every candidate that
//! at least k others beat in a one-sided paired t-test at `alpha` on the
//! length-penalised credits of the (round, query) pairs both have non-missing
//! credits for (accumulated over all blocks). The race ends when at most k
//! candidates remain or after `max_blocks` blocks; the survivors are ranked by
//! their mean penalised credit over **all** blocks they were raced on (fix of
//! spec §10.8: the reference ranked on the last block only, unpenalised) and
//! the top k become the population. The next round starts a new race.
//!
//! With `edit_deletions` > 0 (an extension, off by default) each step also
//! adds that many offspring that delete one sentence of a seeded population
//! member ([`super::edit`]), without a meta-LLM call; with `edit_shots` > 0,
//! that many offspring that fill a seeded member's `{few_shots}` with worked
//! examples from the agent's correct dev rollouts. A candidate is not credited
//! on the queries its examples came from.
//!
//! With `sticky_incumbent` (an extension, off by default) the ranking's first
//! place, the incumbent, changes only when a member clearly beat the old
//! incumbent on their shared queries (more won than lost beyond the tie
//! weight); ties broken by length or by the attributer leave it in place.
//!
//! Length penalty: `length_penalty × tokens(candidate) / tokens(longest
//! initial prompt)`, tokens from the meta-LLM's tokenizer.

use super::meta::{crossover_prompt, mutation_prompt};
use super::{
    rng_for, AgentContext, Design, LocalOptimizer, MetaJob, OptimizeConfig, QueryCredits,
    RunPriority,
};
use rand::Rng;
use serde::{Deserialize, Serialize};
use statrs::distribution::{Binomial, ContinuousCDF, DiscreteCDF, StudentsT};
use std::collections::BTreeMap;

/// One evaluation of a candidate: its credit on one query of one round's block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Eval {
    /// Round (block) of the evaluation.
    pub round: usize,
    /// Dev query index.
    pub query: usize,
    /// Attributed credit, `None` when missing.
    pub credit: Option<f64>,
}

/// A candidate prompt with its lineage and credit history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The prompt template.
    pub prompt: String,
    /// Its length in meta-LLM tokens.
    pub tokens: usize,
    /// Indices of the parent candidates (empty for initial prompts).
    pub parents: Vec<usize>,
    /// Round it was created in (0 = initial pool).
    pub born_round: usize,
    /// Every evaluation so far.
    pub evals: Vec<Eval>,
    /// Round it was eliminated or dropped from the population in, if any.
    pub dropped_round: Option<usize>,
    /// Dev queries its worked examples were taken from (its evaluations on
    /// them are recorded without a credit).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shot_queries: Vec<usize>,
}

/// A race in progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Race {
    /// Candidate indices still racing, population first then offspring.
    pub members: Vec<usize>,
    /// Blocks raced so far.
    pub blocks: usize,
}

#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
enum Stage {
    #[default]
    Idle,
    Crossing(Vec<(usize, usize)>),
    Mutating(Vec<Vec<usize>>),
}

/// CAPO state of one agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Capo {
    /// Every candidate ever created (index = candidate id).
    pub candidates: Vec<Candidate>,
    /// Population, best first (after the last finished race).
    pub population: Vec<usize>,
    /// Race in progress.
    pub race: Option<Race>,
    /// Population size k.
    pub k: usize,
    /// Tokens of the longest initial prompt (length-penalty denominator).
    pub max_len: usize,
    /// Offspring accepted so far.
    pub offspring: usize,
    #[serde(default)]
    stage: Stage,
}

impl Capo {
    /// A CAPO over an agent's initial pool. `k` defaults to the pool size;
    /// `count_tokens` measures prompt lengths.
    pub fn new(pool: &[String], k: Option<usize>, count_tokens: &dyn Fn(&str) -> usize) -> Self {
        let candidates: Vec<Candidate> = pool
            .iter()
            .map(|p| Candidate {
                prompt: p.clone(),
                tokens: count_tokens(p),
                parents: vec![],
                born_round: 0,
                evals: vec![],
                dropped_round: None,
                shot_queries: vec![],
            })
            .collect();
        let max_len = candidates
            .iter()
            .map(|c| c.tokens)
            .max()
            .unwrap_or(1)
            .max(1);
        Self {
            population: (0..candidates.len()).collect(),
            k: k.unwrap_or(pool.len()).max(1),
            candidates,
            race: None,
            max_len,
            offspring: 0,
            stage: Stage::Idle,
        }
    }

    /// Check internal consistency (e.g. after loading a checkpoint): every
    /// population and race member refers to an existing candidate.
    pub fn check(&self) -> Result<(), String> {
        let n = self.candidates.len();
        let race = self.race.iter().flat_map(|r| r.members.iter());
        match self.population.iter().chain(race).find(|&&i| i >= n) {
            Some(i) => Err(format!("candidate index {i} out of range ({n} candidates)")),
            None if self.population.is_empty() => Err("empty population".into()),
            None => Ok(()),
        }
    }

    fn penalty(&self, id: usize, weight: f64) -> f64 {
        weight * self.candidates[id].tokens as f64 / self.max_len as f64
    }

    /// Length-penalised, non-missing credits of a candidate keyed by (round, query).
    pub fn penalised(&self, id: usize, weight: f64) -> BTreeMap<(usize, usize), f64> {
        let pen = self.penalty(id, weight);
        self.candidates[id]
            .evals
            .iter()
            .filter_map(|e| e.credit.map(|c| ((e.round, e.query), c - pen)))
            .collect()
    }

    /// Mean penalised credit over all evaluations (`None` without any).
    pub fn mean_score(&self, id: usize, weight: f64) -> Option<f64> {
        let m = self.penalised(id, weight);
        if m.is_empty() {
            None
        } else {
            Some(m.values().sum::<f64>() / m.len() as f64)
        }
    }

    fn add_candidate(
        &mut self,
        prompt: String,
        parents: Vec<usize>,
        round: usize,
        ctx: &AgentContext,
    ) -> Option<usize> {
        if self.candidates.iter().any(|c| c.prompt == prompt) {
            return None;
        }
        self.candidates.push(Candidate {
            tokens: ctx.llm.count_tokens(&prompt),
            prompt,
            parents,
            born_round: round,
            evals: vec![],
            dropped_round: None,
            shot_queries: vec![],
        });
        self.offspring += 1;
        Some(self.candidates.len() - 1)
    }

    /// Whether candidate `c` clearly beat candidate `inc` on the evaluations
    /// both have: more queries where its (unpenalised) credit exceeds `inc`'s
    /// by more than `margin` than the other way round.
    fn clearly_beats(&self, c: usize, inc: usize, margin: f64) -> bool {
        let credits = |id: usize| -> BTreeMap<(usize, usize), f64> {
            self.candidates[id]
                .evals
                .iter()
                .filter_map(|e| e.credit.map(|x| ((e.round, e.query), x)))
                .collect()
        };
        let (a, b) = (credits(c), credits(inc));
        let (mut wins, mut losses) = (0usize, 0usize);
        for (key, x) in &a {
            if let Some(y) = b.get(key) {
                if x - y > margin + 1e-9 {
                    wins += 1;
                } else if y - x > margin + 1e-9 {
                    losses += 1;
                }
            }
        }
        wins > losses
    }

    fn finish_race(&mut self, members: Vec<usize>, round: usize, config: &OptimizeConfig) {
        let weight = config.length_penalty;
        let mut ranked: Vec<(usize, Option<f64>)> = members
            .iter()
            .map(|&m| (m, self.mean_score(m, weight)))
            .collect();
        // Stable sort: ties keep population-first order.
        ranked.sort_by(|a, b| match (a.1, b.1) {
            (Some(x), Some(y)) => y.partial_cmp(&x).unwrap_or(std::cmp::Ordering::Equal),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        });
        // A sticky incumbent keeps first place unless a member ranked above
        // it clearly beat it: a tie, a shorter prompt or the attributer's
        // small refinement of a tie (at most `ofat_tie_weight` under `ofat`)
        // does not move it.
        if config.sticky_incumbent {
            let old = self.population.first().copied();
            if let Some(pos) = old.and_then(|o| ranked.iter().position(|r| r.0 == o)) {
                let margin = match config.design {
                    Design::Ofat => config.ofat_tie_weight,
                    Design::Joint => 0.0,
                };
                let lead = ranked[..pos]
                    .iter()
                    .position(|r| self.clearly_beats(r.0, ranked[pos].0, margin))
                    .unwrap_or(pos);
                let first = ranked.remove(lead);
                ranked.insert(0, first);
            }
        }
        self.population = ranked.iter().take(self.k).map(|r| r.0).collect();
        for r in ranked.iter().skip(self.k) {
            self.candidates[r.0].dropped_round = Some(round);
        }
        self.race = None;
    }
}

/// p-value of the one-sided paired t-test "mean(b − a) > 0" (scipy's
/// `ttest_rel(b, a, alternative="greater")`). With fewer than 2 pairs the
/// test cannot reject (p = 1). With zero variance of the differences, p = 0
/// when the mean difference is positive and 1 otherwise.
pub fn paired_t_greater(b: &[f64], a: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    if n < 2 {
        return 1.0;
    }
    let d: Vec<f64> = (0..n).map(|i| b[i] - a[i]).collect();
    let mean = d.iter().sum::<f64>() / n as f64;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    if var <= 1e-24 {
        return if mean > 1e-12 { 0.0 } else { 1.0 };
    }
    let t = mean / (var / n as f64).sqrt();
    match StudentsT::new(0.0, 1.0, (n - 1) as f64) {
        Ok(dist) => dist.sf(t),
        Err(_) => 1.0,
    }
}

/// p-value of the one-sided sign test "`b` is better than `a`" over paired
/// items: with `w` items where `b` scores higher and `l` where it scores
/// lower (ties left out), P[X ≥ w] for X ~ Binomial(w + l, 1/2). 1 without
/// any differing item; only the first `min(len)` items are paired.
pub fn sign_test_greater(b: &[f64], a: &[f64]) -> f64 {
    let (mut wins, mut losses) = (0u64, 0u64);
    for (x, y) in b.iter().zip(a) {
        if x > y {
            wins += 1;
        } else if x < y {
            losses += 1;
        }
    }
    if wins == 0 {
        return 1.0;
    }
    match Binomial::new(0.5, wins + losses) {
        Ok(dist) => dist.sf(wins - 1),
        Err(_) => 1.0,
    }
}

/// One racing decision: `scores[i]` are candidate i's penalised credits keyed
/// by (round, query). Candidate a is eliminated when at least `k` others are
/// significantly better on the keys both have (p < alpha). Returns the keep
/// mask; if everything would go, the candidate with the best mean is kept.
pub fn race_keep(scores: &[BTreeMap<(usize, usize), f64>], k: usize, alpha: f64) -> Vec<bool> {
    let n = scores.len();
    let mut keep = vec![true; n];
    for a in 0..n {
        let mut better = 0;
        for b in 0..n {
            if a == b {
                continue;
            }
            let (mut xa, mut xb) = (Vec::new(), Vec::new());
            for (key, va) in &scores[a] {
                if let Some(vb) = scores[b].get(key) {
                    xa.push(*va);
                    xb.push(*vb);
                }
            }
            if paired_t_greater(&xb, &xa) < alpha {
                better += 1;
            }
        }
        if better >= k {
            keep[a] = false;
        }
    }
    if n > 0 && !keep.iter().any(|&x| x) {
        let mean = |m: &BTreeMap<(usize, usize), f64>| {
            if m.is_empty() {
                f64::NEG_INFINITY
            } else {
                m.values().sum::<f64>() / m.len() as f64
            }
        };
        let best = (0..n).fold(0, |best, i| {
            if mean(&scores[i]) > mean(&scores[best]) {
                i
            } else {
                best
            }
        });
        keep[best] = true;
    }
    keep
}

impl LocalOptimizer for Capo {
    fn propose_phase(
        &mut self,
        phase: usize,
        outputs: &[Option<String>],
        ctx: &AgentContext,
    ) -> Option<Vec<MetaJob>> {
        let stage = std::mem::take(&mut self.stage);
        match (phase, stage) {
            (0, _) => {
                if self.race.is_some() {
                    return None;
                }
                let n = ctx.config.crossovers_per_round;
                let mut rng = rng_for(ctx.seed("capo-parents", 0), &[]);
                if self.population.len() >= 2 {
                    let mut pairs = Vec::with_capacity(n);
                    let mut jobs = Vec::with_capacity(n);
                    for j in 0..n {
                        let idx = rand::seq::index::sample(&mut rng, self.population.len(), 2);
                        let (a, b) = (self.population[idx.index(0)], self.population[idx.index(1)]);
                        let (ma, fa) = (&self.candidates[a].prompt, &self.candidates[b].prompt);
                        jobs.push(MetaJob {
                            prompt: crossover_prompt(ctx.agent, ma, fa),
                            seed: ctx.seed("crossover", j as u64),
                            sources: vec![ma.clone(), fa.clone()],
                        });
                        pairs.push((a, b));
                    }
                    self.stage = Stage::Crossing(pairs);
                    Some(jobs)
                } else {
                    // A population of one: mutate it directly.
                    let p = self.population.first().copied()?;
                    let jobs = (0..n)
                        .map(|j| MetaJob {
                            prompt: mutation_prompt(ctx.agent, &self.candidates[p].prompt),
                            seed: ctx.seed("mutation", j as u64),
                            sources: vec![self.candidates[p].prompt.clone()],
                        })
                        .collect();
                    self.stage = Stage::Mutating(vec![vec![p]; n]);
                    Some(jobs)
                }
            }
            (_, Stage::Crossing(pairs)) => {
                let mut jobs = Vec::new();
                let mut lineage = Vec::new();
                for (j, (child, (a, b))) in outputs.iter().zip(pairs).enumerate() {
                    // A crossover the rewriter could not produce (rejected
                    // twice) falls back to mutating the first parent, so the
                    // race keeps its number of offspring.
                    let (child, parents) = match child {
                        Some(child) => (child, vec![a, b]),
                        None => (&self.candidates[a].prompt, vec![a]),
                    };
                    jobs.push(MetaJob {
                        prompt: mutation_prompt(ctx.agent, child),
                        seed: ctx.seed("mutation", j as u64),
                        sources: vec![child.clone()],
                    });
                    lineage.push(parents);
                }
                self.stage = Stage::Mutating(lineage);
                Some(jobs)
            }
            (_, Stage::Mutating(lineage)) => {
                let mut members = self.population.clone();
                for (out, parents) in outputs.iter().zip(lineage) {
                    if let Some(p) = out {
                        if let Some(id) = self.add_candidate(p.clone(), parents, ctx.round, ctx) {
                            members.push(id);
                        }
                    }
                }
                for j in 0..ctx.config.edit_deletions {
                    let mut rng = rng_for(ctx.seed("deletion", j as u64), &[]);
                    let parent = self.population[rng.random_range(0..self.population.len())];
                    let edited = super::edit::delete_sentence(
                        &self.candidates[parent].prompt,
                        ctx.agent,
                        &mut rng,
                    );
                    if let Some(p) = edited {
                        if let Some(id) = self.add_candidate(p, vec![parent], ctx.round, ctx) {
                            members.push(id);
                        }
                    }
                }
                let max_shots = ctx.config.max_shots.min(ctx.shots.len());
                let fillable: Vec<usize> = if ctx.config.edit_shots > 0 && max_shots > 0 {
                    self.population
                        .iter()
                        .copied()
                        .filter(|&m| super::edit::takes_shots(&self.candidates[m].prompt))
                        .collect()
                } else {
                    Vec::new()
                };
                if !fillable.is_empty() {
                    for j in 0..ctx.config.edit_shots {
                        let mut rng = rng_for(ctx.seed("shots", j as u64), &[]);
                        let parent = fillable[rng.random_range(0..fillable.len())];
                        let n = rng.random_range(1..=max_shots);
                        let picked: Vec<&super::edit::Shot> =
                            rand::seq::index::sample(&mut rng, ctx.shots.len(), n)
                                .iter()
                                .map(|i| &ctx.shots[i])
                                .collect();
                        let filled = super::edit::fill_shots(
                            &self.candidates[parent].prompt,
                            &picked,
                            ctx.agent,
                        );
                        if let Some(p) = filled {
                            if let Some(id) = self.add_candidate(p, vec![parent], ctx.round, ctx) {
                                self.candidates[id].shot_queries =
                                    picked.iter().map(|s| s.query).collect();
                                members.push(id);
                            }
                        }
                    }
                }
                self.race = Some(Race { members, blocks: 0 });
                None
            }
            (_, Stage::Idle) => None,
        }
    }

    fn candidates_to_run(&self) -> Vec<String> {
        match &self.race {
            Some(r) => r
                .members
                .iter()
                .map(|&m| self.candidates[m].prompt.clone())
                .collect(),
            None => vec![self.incumbent()],
        }
    }

    /// Race members with fewer credited evaluations first, then the newest:
    /// when a round runs only some members (`ofat_max_candidates`), a new
    /// offspring is tried in the round it was born instead of waiting behind
    /// untested prompts of the initial pool (and being dropped unevaluated
    /// when the race ends, as unevaluated members rank last).
    fn run_priority(&self) -> Vec<RunPriority> {
        let priority = |c: &Candidate| {
            let credited = c.evals.iter().filter(|e| e.credit.is_some()).count();
            (credited, std::cmp::Reverse(c.born_round))
        };
        match &self.race {
            Some(r) => r
                .members
                .iter()
                .map(|&m| priority(&self.candidates[m]))
                .collect(),
            None => vec![RunPriority::default()],
        }
    }

    fn update(&mut self, round: usize, evals: &[QueryCredits], ctx: &AgentContext) {
        let weight = ctx.config.length_penalty;
        let Some(mut race) = self.race.take() else {
            return;
        };
        for (&m, credits) in race.members.iter().zip(evals) {
            let c = &mut self.candidates[m];
            for &(query, credit) in credits {
                // An example's own query would credit the answer key.
                let credit = credit.filter(|_| !c.shot_queries.contains(&query));
                c.evals.push(Eval {
                    round,
                    query,
                    credit,
                });
            }
        }
        race.blocks += 1;
        if race.members.len() > self.k {
            let scores: Vec<_> = race
                .members
                .iter()
                .map(|&m| self.penalised(m, weight))
                .collect();
            let keep = race_keep(&scores, self.k, ctx.config.alpha);
            let mut survivors = Vec::new();
            for (&m, kept) in race.members.iter().zip(keep) {
                if kept {
                    survivors.push(m);
                } else {
                    self.candidates[m].dropped_round = Some(round);
                    tracing::debug!(agent = %ctx.agent.name, candidate = m, round, "eliminated by racing");
                }
            }
            race.members = survivors;
        }
        if race.members.len() <= self.k || race.blocks >= ctx.config.max_blocks {
            self.finish_race(race.members, round, ctx.config);
        } else {
            self.race = Some(race);
        }
    }

    fn incumbent(&self) -> String {
        self.population
            .first()
            .map(|&i| self.candidates[i].prompt.clone())
            .unwrap_or_default()
    }

    fn population(&self) -> Vec<String> {
        self.population
            .iter()
            .map(|&i| self.candidates[i].prompt.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::AgentSpec;
    use crate::llm::ScriptedLlm;
    use crate::optimize::OptimizeConfig;

    fn keyed(v: &[f64]) -> BTreeMap<(usize, usize), f64> {
        v.iter().enumerate().map(|(i, x)| ((1, i), *x)).collect()
    }

    #[test]
    fn t_test_matches_known_values() {
        // d = [1, 2, 3, 4]: mean 2.5, sd 1.29099, t = 3.8730, df 3 -> one-sided p = 0.015224
        let p = paired_t_greater(&[1.0, 2.0, 3.0, 4.0], &[0.0; 4]);
        assert!((p - 0.015224).abs() < 1e-5, "p = {p}");
        // d = [0.5, -0.3, 0.2, 0.1, -0.1]: mean .08, sd .30332, t = .58977, df 4 -> p = .29355
        let p = paired_t_greater(&[0.5, -0.3, 0.2, 0.1, -0.1], &[0.0; 5]);
        assert!((p - 0.29355).abs() < 1e-4, "p = {p}");
        // t = 0 -> p = 0.5
        let p = paired_t_greater(&[1.0, -1.0, 1.0, -1.0], &[0.0; 4]);
        assert!((p - 0.5).abs() < 1e-12);
        // constant positive difference -> certain; constant zero -> no evidence; n<2 -> no evidence
        assert_eq!(paired_t_greater(&[1.0, 1.0, 1.0], &[0.0; 3]), 0.0);
        assert_eq!(paired_t_greater(&[0.0; 3], &[0.0; 3]), 1.0);
        assert_eq!(paired_t_greater(&[5.0], &[0.0]), 1.0);
    }

    #[test]
    fn sign_test_matches_binomial_tails() {
        // 5 wins, 0 losses: 1/32; ties do not count.
        let b = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0];
        let a = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0];
        assert!((sign_test_greater(&b, &a) - 1.0 / 32.0).abs() < 1e-12);
        // 3 wins, 1 loss: P[X >= 3 | n = 4] = 5/16.
        let b = [1.0, 1.0, 1.0, 0.0];
        let a = [0.0, 0.0, 0.0, 1.0];
        assert!((sign_test_greater(&b, &a) - 5.0 / 16.0).abs() < 1e-12);
        // The other way round: 1 win, 3 losses: 15/16.
        assert!((sign_test_greater(&a, &b) - 15.0 / 16.0).abs() < 1e-12);
        // No wins, or nothing differs: 1.
        assert_eq!(sign_test_greater(&[0.0, 0.5], &[1.0, 0.5]), 1.0);
        assert_eq!(sign_test_greater(&a, &a), 1.0);
        assert_eq!(sign_test_greater(&[], &[]), 1.0);
    }

    #[test]
    fn racing_eliminates_only_when_k_others_are_better() {
        let strong = keyed(&[1.0, 2.0, 3.0, 4.0]); // vs weak: p = 0.0152
        let weak = keyed(&[0.0; 4]);
        let noisy = keyed(&[0.5, -0.3, 0.2, 0.1]); // vs weak: not significant at 0.2? see below
                                                   // 3 strong candidates are each significantly better than `weak` (p = 0.0152 < 0.2).
        let scores = vec![strong.clone(), strong.clone(), strong.clone(), weak.clone()];
        assert_eq!(race_keep(&scores, 3, 0.2), vec![true, true, true, false]);
        // With k = 4 three better ones are not enough.
        assert_eq!(race_keep(&scores, 4, 0.2), vec![true; 4]);
        // With alpha = 0.01 the difference is not significant (p = 0.0152).
        assert_eq!(race_keep(&scores, 3, 0.01), vec![true; 4]);
        // noisy vs weak: d = [.5,-.3,.2,.1], mean .125, sd .33040, t = .75666, df 3, p = .2521 > 0.2
        let p = paired_t_greater(&[0.5, -0.3, 0.2, 0.1], &[0.0; 4]);
        assert!((p - 0.2521).abs() < 1e-3, "p = {p}");
        let scores = vec![noisy.clone(), weak.clone()];
        assert_eq!(race_keep(&scores, 1, 0.2), vec![true, true]);
        // ... but at alpha = 0.3 weak goes.
        assert_eq!(race_keep(&scores, 1, 0.3), vec![true, false]);
    }

    #[test]
    fn racing_pairs_only_shared_queries() {
        // a and b share no query: never comparable.
        let a: BTreeMap<_, _> = [((1, 0), 1.0), ((1, 1), 1.0), ((1, 2), 1.0)].into();
        let b: BTreeMap<_, _> = [((2, 0), -1.0), ((2, 1), -1.0), ((2, 2), -1.0)].into();
        assert_eq!(race_keep(&[a, b], 1, 0.2), vec![true, true]);
    }

    fn agent() -> AgentSpec {
        AgentSpec {
            name: "solver".into(),
            task_description: "Solve.".into(),
            input_vars: vec!["query".into()],
            output_vars: vec!["answer".into()],
            tools: vec![],
            max_tool_calls: 0,
            output_grammars: Default::default(),
            fenced_outputs: Vec::new(),
        }
    }

    #[test]
    fn capo_step_proposes_races_and_ranks_on_all_blocks() {
        let llm = ScriptedLlm::new(|_| String::new());
        let agent = agent();
        let cfg = OptimizeConfig {
            crossovers_per_round: 2,
            max_blocks: 2,
            length_penalty: 0.0,
            ..Default::default()
        };
        let pool: Vec<String> = (0..3).map(|i| format!("P{i} {{query}} <answer>")).collect();
        let mut capo = Capo::new(&pool, None, &|s| s.split_whitespace().count());
        assert_eq!(capo.k, 3);
        let ctx = AgentContext {
            agent: &agent,
            run_seed: 7,
            round: 1,
            config: &cfg,
            llm: &llm,
            shots: &[],
        };
        let jobs = capo.propose_phase(0, &[], &ctx).unwrap();
        assert_eq!(jobs.len(), 2);
        assert!(jobs[0].prompt.contains("<template_a>"));
        let jobs = capo
            .propose_phase(1, &[Some("C0 {query} <answer>".into()), None], &ctx)
            .unwrap();
        assert_eq!(
            jobs.len(),
            2,
            "a rejected crossover falls back to mutating its first parent"
        );
        assert_eq!(jobs[0].sources, vec!["C0 {query} <answer>".to_string()]);
        assert_eq!(jobs[1].sources.len(), 1);
        assert!(pool.contains(&jobs[1].sources[0]));
        assert!(jobs[1].prompt.contains(&jobs[1].sources[0]));
        // The fallback mutation is rejected too: no offspring from that pair.
        assert!(capo
            .propose_phase(2, &[Some("M0 {query} <answer>".into()), None], &ctx)
            .is_none());
        let run = capo.candidates_to_run();
        assert_eq!(run.len(), 4);
        assert_eq!(run[3], "M0 {query} <answer>");
        // Block 1: mutant best on every query, P0 worst.
        let ev = |xs: [f64; 4]| -> Vec<QueryCredits> {
            xs.iter()
                .map(|&x| (0..5).map(|q| (q, Some(x + 0.01 * q as f64))).collect())
                .collect()
        };
        capo.update(1, &ev([-1.0, 0.0, 0.2, 1.0]), &ctx);
        // P0 is beaten by 3 others with constant differences -> eliminated; 3 left = k -> race over.
        assert!(capo.race.is_none());
        assert_eq!(
            capo.population(),
            vec![
                "M0 {query} <answer>",
                "P2 {query} <answer>",
                "P1 {query} <answer>"
            ]
        );
        assert_eq!(capo.incumbent(), "M0 {query} <answer>");
        assert_eq!(capo.candidates[0].dropped_round, Some(1));
        // Deterministic parent choice for the same seed.
        let mut again = Capo::new(&pool, None, &|s| s.split_whitespace().count());
        let j2 = again.propose_phase(0, &[], &ctx).unwrap();
        assert_eq!(j2, jobs_for(&pool, &ctx));
    }

    /// The context of round 1 of run seed 3, without worked examples.
    fn round_one<'a>(
        agent: &'a AgentSpec,
        config: &'a OptimizeConfig,
        llm: &'a ScriptedLlm,
    ) -> AgentContext<'a> {
        AgentContext {
            agent,
            run_seed: 3,
            round: 1,
            config,
            llm,
            shots: &[],
        }
    }

    /// One CAPO step on `pool` whose meta jobs (a crossover, then the
    /// fallback mutation of its first parent) are both rejected: what races
    /// besides the pool comes from the edit operators, which make no meta call.
    fn edit_step(pool: &[String], ctx: &AgentContext) -> Capo {
        let mut capo = Capo::new(pool, None, &|s| s.split_whitespace().count());
        let jobs = capo.propose_phase(0, &[], ctx).unwrap();
        assert_eq!(jobs.len(), 1, "edits add no meta job");
        let jobs = capo.propose_phase(1, &[None], ctx).unwrap();
        assert_eq!(jobs.len(), 1, "only the fallback mutation");
        assert!(capo.propose_phase(2, &[None], ctx).is_none());
        capo
    }

    #[test]
    fn deletion_offspring_join_the_race_without_meta_calls() {
        let llm = ScriptedLlm::new(|_| String::new());
        let agent = agent();
        let pool: Vec<String> = (0..2)
            .map(|i| format!("Solve it, style {i}. Show the steps. Always answer 0.\n{{query}}\nAnswer in <answer></answer>."))
            .collect();
        let run = |deletions: usize| {
            let cfg = OptimizeConfig {
                crossovers_per_round: 1,
                edit_deletions: deletions,
                ..Default::default()
            };
            edit_step(&pool, &round_one(&agent, &cfg, &llm))
        };
        assert_eq!(
            run(0).candidates_to_run(),
            pool,
            "no deletion: the pool races alone"
        );
        let capo = run(3);
        let racing = capo.candidates_to_run();
        assert!(racing.len() > pool.len(), "{racing:?}");
        for c in &capo.candidates[pool.len()..] {
            let parent = &capo.candidates[c.parents[0]].prompt;
            assert_eq!(c.parents.len(), 1);
            let removed = super::super::edit::deletable_sentences(parent)
                .into_iter()
                .filter(|r| !c.prompt.contains(parent[r.clone()].trim()))
                .count();
            assert_eq!(removed, 1, "{} <- {}", c.prompt, parent);
            assert!(c.prompt.contains("{query}") && c.prompt.contains("<answer>"));
        }
        assert_eq!(run(3), capo, "seeded");
    }

    #[test]
    fn shot_offspring_carry_examples_and_are_not_credited_on_their_queries() {
        use super::super::edit::Shot;
        let llm = ScriptedLlm::new(|_| String::new());
        let agent = agent();
        let pool: Vec<String> = (0..2)
            .map(|i| format!("Solve it, style {i}.\n{{query}}\n<few_shots_section>\nExamples:\n{{few_shots}}\n</few_shots_section>\nAnswer in <answer></answer>."))
            .collect();
        let shots: Vec<Shot> = [4, 9, 11]
            .iter()
            .map(|&q| Shot {
                query: q,
                input: format!("query: `q{q}`\n"),
                outputs: vec![("answer".into(), q.to_string())],
            })
            .collect();
        let cfg = OptimizeConfig {
            crossovers_per_round: 1,
            edit_shots: 3,
            max_shots: 2,
            ..Default::default()
        };
        let run = |shots: &[Shot]| {
            let ctx = AgentContext {
                agent: &agent,
                run_seed: 5,
                round: 2,
                config: &cfg,
                llm: &llm,
                shots,
            };
            edit_step(&pool, &ctx)
        };
        assert_eq!(
            run(&[]).candidates_to_run(),
            pool,
            "no examples yet: no offspring"
        );
        let mut capo = run(&shots);
        assert_eq!(run(&shots), capo, "seeded");
        let born: Vec<Candidate> = capo.candidates[pool.len()..].to_vec();
        assert!(!born.is_empty());
        for c in &born {
            assert!((1..=2).contains(&c.shot_queries.len()), "{c:?}");
            for q in &c.shot_queries {
                assert!(
                    c.prompt.contains(&format!("<answer>{q}</answer>")),
                    "{}",
                    c.prompt
                );
            }
            assert!(
                !c.prompt.contains("few_shots"),
                "placeholder and section filled: {}",
                c.prompt
            );
            assert!(c.prompt.contains("{query}") && c.prompt.contains("Examples:"));
            assert_eq!(c.parents.len(), 1);
        }
        // Evaluated on a block holding one of its example queries: that
        // query is recorded without credit, the others keep theirs.
        let members = capo.race.as_ref().unwrap().members.clone();
        let block = [4usize, 9, 11, 20];
        let evals: Vec<QueryCredits> = members
            .iter()
            .map(|_| block.iter().map(|&q| (q, Some(0.5))).collect())
            .collect();
        let ctx = AgentContext {
            agent: &agent,
            run_seed: 5,
            round: 2,
            config: &cfg,
            llm: &llm,
            shots: &shots,
        };
        capo.update(2, &evals, &ctx);
        for &m in &members {
            let c = &capo.candidates[m];
            for e in &c.evals {
                let expected = (!c.shot_queries.contains(&e.query)).then_some(0.5);
                assert_eq!(e.credit, expected, "candidate {m}, query {}", e.query);
            }
        }
    }

    /// A two-prompt population (long incumbent first, a short one) raced on
    /// one block with the given credits of (incumbent, short); returns the
    /// incumbent afterwards.
    fn incumbent_after(sticky: bool, long: f64, short: [f64; 4]) -> String {
        let llm = ScriptedLlm::new(|_| String::new());
        let agent = agent();
        let cfg = OptimizeConfig {
            crossovers_per_round: 1,
            length_penalty: 0.5,
            design: Design::Ofat,
            ofat_tie_weight: 0.25,
            sticky_incumbent: sticky,
            ..Default::default()
        };
        let pool = vec![
            "L L L L L L {query} <answer>".to_string(),
            "S {query} <answer>".to_string(),
        ];
        let ctx = round_one(&agent, &cfg, &llm);
        let mut capo = edit_step(&pool, &ctx);
        let credits = |xs: [f64; 4]| -> QueryCredits {
            xs.iter().enumerate().map(|(q, &x)| (q, Some(x))).collect()
        };
        capo.update(1, &[credits([long; 4]), credits(short)], &ctx);
        assert!(capo.race.is_none());
        capo.incumbent()
    }

    #[test]
    fn sticky_incumbent_moves_only_for_a_clear_win() {
        let long = "L L L L L L {query} <answer>";
        let short = "S {query} <answer>";
        // A tie: the paper's rule lets the length penalty pick the short one.
        assert_eq!(incumbent_after(false, 0.0, [0.0; 4]), short);
        assert_eq!(incumbent_after(true, 0.0, [0.0; 4]), long);
        // Tie refinements (at most the tie weight) are not a clear win either.
        assert_eq!(incumbent_after(true, 0.0, [0.2, 0.2, 0.1, 0.0]), long);
        // One query won outright, none lost: it moves.
        assert_eq!(incumbent_after(true, 0.0, [1.0, 0.0, 0.0, 0.0]), short);
        // One won and one lost: a draw keeps the incumbent.
        assert_eq!(incumbent_after(true, 0.0, [1.0, -1.0, 0.2, 0.0]), long);
    }

    fn jobs_for(pool: &[String], ctx: &AgentContext) -> Vec<MetaJob> {
        let mut c = Capo::new(pool, None, &|s| s.split_whitespace().count());
        c.propose_phase(0, &[], ctx).unwrap()
    }

    #[test]
    fn race_stops_after_max_blocks_and_uses_all_blocks_with_penalty() {
        let llm = ScriptedLlm::new(|_| String::new());
        let agent = agent();
        let cfg = OptimizeConfig {
            crossovers_per_round: 1,
            max_blocks: 2,
            length_penalty: 0.5,
            ..Default::default()
        };
        // Two prompts: a short one and a long one (twice as long).
        let pool = vec![
            "S {query} <answer>".to_string(),
            "L L L L {query} <answer> x y".to_string(),
        ];
        let mut capo = Capo::new(&pool, Some(1), &|s| s.split_whitespace().count());
        let ctx = AgentContext {
            agent: &agent,
            run_seed: 1,
            round: 1,
            config: &cfg,
            llm: &llm,
            shots: &[],
        };
        capo.propose_phase(0, &[], &ctx);
        capo.propose_phase(1, &[None], &ctx);
        capo.propose_phase(2, &[], &ctx);
        assert_eq!(capo.candidates_to_run().len(), 2);
        // Block 1: long is better by 0.2 on average but noisy -> no elimination at k=1? It needs 1 better.
        let noisy = |base: f64, round: usize| -> QueryCredits {
            (0..4)
                .map(|q| {
                    (
                        q,
                        Some(base + if (q + round) % 2 == 0 { 0.6 } else { -0.6 }),
                    )
                })
                .collect()
        };
        capo.update(1, &[noisy(0.0, 0), noisy(0.2, 1)], &ctx);
        assert!(capo.race.is_some(), "not significant yet, and 2 > k = 1");
        let ctx2 = AgentContext { round: 2, ..ctx };
        capo.update(2, &[noisy(0.0, 1), noisy(0.2, 0)], &ctx2);
        assert!(capo.race.is_none(), "max_blocks reached");
        // Raw means: short 0.0, long 0.2; penalties: short 0.5*3/8, long 0.5*8/8 -> short wins.
        assert_eq!(capo.population(), vec!["S {query} <answer>"]);
        assert!((capo.mean_score(0, 0.5).unwrap() - (-0.1875)).abs() < 1e-12);
        assert!((capo.mean_score(1, 0.5).unwrap() - (-0.3)).abs() < 1e-12);
    }
}
