//! EvoPrompt-GA local optimizer (ablation "alt. optimizer", spec §4.5).
//!
//! Each round: k children, each written by one GA meta call (crossover then
//! mutation in one prompt) from two parents drawn by roulette wheel on the
//! population scores; the children are evaluated once (one block) and the k
//! best of parents ∪ children by mean credit are kept. As in the reference,
//! the initial population is not evaluated (scores 0). Fix of spec §10.16:
//! negative scores are shifted so the wheel weights are never negative (the
//! reference crashed); all-equal weights fall back to uniform.

use super::meta::ga_prompt;
use super::{rng_for, AgentContext, LocalOptimizer, MetaJob, QueryCredits};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// A population member and its score (mean credit of its evaluation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// The prompt template.
    pub prompt: String,
    /// Mean credit (0 for initial prompts, which are not evaluated).
    pub score: f64,
}

/// EvoPrompt-GA state of one agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvoPrompt {
    /// Population, best first.
    pub members: Vec<Member>,
    /// Population size k.
    pub k: usize,
    /// Children awaiting evaluation this round.
    pub children: Vec<String>,
    #[serde(default)]
    proposing: bool,
}

impl EvoPrompt {
    /// An EvoPrompt over an agent's initial pool (`k` defaults to the pool size).
    pub fn new(pool: &[String], k: Option<usize>) -> Self {
        Self {
            members: pool
                .iter()
                .map(|p| Member {
                    prompt: p.clone(),
                    score: 0.0,
                })
                .collect(),
            k: k.unwrap_or(pool.len()).max(1),
            children: vec![],
            proposing: false,
        }
    }

    fn pick(&self, rng: &mut impl Rng) -> usize {
        let n = self.members.len();
        let min = self
            .members
            .iter()
            .map(|m| m.score)
            .fold(f64::INFINITY, f64::min);
        let w: Vec<f64> = self
            .members
            .iter()
            .map(|m| m.score - min.min(0.0))
            .collect();
        let total: f64 = w.iter().sum();
        if !(total > 0.0) || !total.is_finite() {
            return rng.random_range(0..n);
        }
        let mut x = rng.random::<f64>() * total;
        for (i, wi) in w.iter().enumerate() {
            if x < *wi {
                return i;
            }
            x -= wi;
        }
        n - 1
    }
}

impl LocalOptimizer for EvoPrompt {
    fn propose_phase(
        &mut self,
        phase: usize,
        outputs: &[Option<String>],
        ctx: &AgentContext,
    ) -> Option<Vec<MetaJob>> {
        if phase == 0 {
            if self.members.is_empty() {
                return None;
            }
            let mut rng = rng_for(ctx.seed("ga-parents", 0), &[]);
            let jobs = (0..self.k)
                .map(|j| {
                    let a = self.pick(&mut rng);
                    let b = self.pick(&mut rng);
                    let (pa, pb) = (&self.members[a].prompt, &self.members[b].prompt);
                    MetaJob {
                        prompt: ga_prompt(ctx.agent, pa, pb),
                        seed: ctx.seed("ga", j as u64),
                        sources: vec![pa.clone(), pb.clone()],
                    }
                })
                .collect();
            self.proposing = true;
            return Some(jobs);
        }
        if self.proposing {
            self.proposing = false;
            self.children.clear();
            for p in outputs.iter().flatten() {
                if !self.members.iter().any(|m| &m.prompt == p) && !self.children.contains(p) {
                    self.children.push(p.clone());
                }
            }
        }
        None
    }

    fn candidates_to_run(&self) -> Vec<String> {
        if self.children.is_empty() {
            vec![self.incumbent()]
        } else {
            self.children.clone()
        }
    }

    fn update(&mut self, _round: usize, evals: &[QueryCredits], _ctx: &AgentContext) {
        if self.children.is_empty() {
            return;
        }
        let children = std::mem::take(&mut self.children);
        for (child, credits) in children.into_iter().zip(evals) {
            let vals: Vec<f64> = credits.iter().filter_map(|c| c.1).collect();
            if vals.is_empty() {
                continue;
            }
            let score = vals.iter().sum::<f64>() / vals.len() as f64;
            self.members.push(Member {
                prompt: child,
                score,
            });
        }
        // Stable: parents keep precedence over equal-scoring children.
        self.members.sort_by(|a, b| {
            b.score
                .partial_cmp(&a.score)
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        self.members.truncate(self.k);
    }

    fn incumbent(&self) -> String {
        self.members
            .first()
            .map(|m| m.prompt.clone())
            .unwrap_or_default()
    }

    fn population(&self) -> Vec<String> {
        self.members.iter().map(|m| m.prompt.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::AgentSpec;
    use crate::llm::ScriptedLlm;
    use crate::optimize::OptimizeConfig;

    #[test]
    fn keeps_top_k_of_parents_and_children_and_survives_negative_scores() {
        let llm = ScriptedLlm::new(|_| String::new());
        let agent = AgentSpec {
            name: "a".into(),
            task_description: "Do.".into(),
            input_vars: vec!["query".into()],
            output_vars: vec!["answer".into()],
            tools: vec![],
            max_tool_calls: 0,
            output_grammars: Default::default(),
            fenced_outputs: Vec::new(),
        };
        let cfg = OptimizeConfig::default();
        let ctx = AgentContext {
            agent: &agent,
            run_seed: 3,
            round: 1,
            config: &cfg,
            llm: &llm,
            shots: &[],
        };
        let pool: Vec<String> = vec!["A".into(), "B".into()];
        let mut ga = EvoPrompt::new(&pool, None);
        let jobs = ga.propose_phase(0, &[], &ctx).unwrap();
        assert_eq!(jobs.len(), 2);
        assert!(ga
            .propose_phase(1, &[Some("C".into()), Some("A".into())], &ctx)
            .is_none());
        assert_eq!(
            ga.candidates_to_run(),
            vec!["C"],
            "duplicate of a parent dropped"
        );
        ga.update(1, &[vec![(0, Some(0.5)), (1, None), (2, Some(0.3))]], &ctx);
        assert_eq!(ga.population(), vec!["C", "A"]);
        assert!((ga.members[0].score - 0.4).abs() < 1e-12);
        // Negative scores: wheel still works.
        ga.members[0].score = -0.5;
        ga.members[1].score = -0.9;
        let ctx2 = AgentContext { round: 2, ..ctx };
        assert_eq!(ga.propose_phase(0, &[], &ctx2).map(|j| j.len()), Some(2));
    }
}
