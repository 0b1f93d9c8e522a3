//! The real [`Executor`]: runs joint configurations through the MAS runtime
//! ([`crate::eval::execute`]) on a task's dev and validation examples, so the
//! optimizer's execute step is one batched workload on the local engine.

use super::Executor;
use crate::attribution::Rollout;
use crate::eval::{self, EvalOptions, ScoredRun};
use crate::graph::{PromptSet, Setup};
use crate::llm::Llm;
use crate::task::{Example, Task};
use std::collections::BTreeMap;

/// An [`Executor`] over the graph runtime, a task and an LLM.
pub struct MasExecutor<'a> {
    llm: &'a dyn Llm,
    setup: Setup,
    task: &'a dyn Task,
    dev: Vec<Example>,
    validation: Vec<Example>,
    opts: EvalOptions,
    progress: Option<&'a (dyn Fn(usize, usize) + Sync)>,
}

impl<'a> MasExecutor<'a> {
    /// Build from loaded examples; `opts.seed` is replaced per call.
    pub fn new(
        llm: &'a dyn Llm,
        setup: Setup,
        task: &'a dyn Task,
        dev: Vec<Example>,
        validation: Vec<Example>,
        opts: EvalOptions,
    ) -> Self {
        Self {
            llm,
            setup,
            task,
            dev,
            validation,
            opts,
            progress: None,
        }
    }

    /// Report (runs done, runs total) during each execute/validate call.
    pub fn with_progress(mut self, f: &'a (dyn Fn(usize, usize) + Sync)) -> Self {
        self.progress = Some(f);
        self
    }

    /// The dev examples (indexed like the optimizer's query indices).
    pub fn dev(&self) -> &[Example] {
        &self.dev
    }

    fn run(
        &self,
        configs: &[PromptSet],
        examples: &[Example],
        seed: u64,
    ) -> anyhow::Result<Vec<Vec<ScoredRun>>> {
        let opts = EvalOptions {
            seed,
            ..self.opts.clone()
        };
        let total = configs.len() * examples.len();
        let cb = |n: usize| {
            if let Some(p) = self.progress {
                p(n, total)
            }
        };
        Ok(eval::execute(
            self.llm,
            &self.setup,
            self.task,
            configs,
            examples,
            &opts,
            Some(&cb),
        )?)
    }
}

/// Convert a scored run into the optimizer's rollout (last outputs per agent).
pub fn to_rollout(r: &ScoredRun) -> Rollout {
    let mut agent_outputs: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for c in &r.result.calls {
        let e = agent_outputs.entry(c.agent.clone()).or_default();
        for (k, v) in &c.outputs {
            e.insert(k.clone(), v.clone());
        }
        if !c.format_failures.is_empty() {
            e.insert("_format_failures".into(), c.format_failures.join(", "));
        }
    }
    Rollout {
        score: r.score,
        prediction: r.result.prediction.clone(),
        agent_outputs,
        input_tokens: r.result.input_tokens,
        output_tokens: r.result.output_tokens,
    }
}

impl Executor for MasExecutor<'_> {
    fn setup(&self) -> &Setup {
        &self.setup
    }

    fn num_dev(&self) -> usize {
        self.dev.len()
    }

    fn query_text(&self, idx: usize) -> String {
        self.dev
            .get(idx)
            .map(|e| e.query.clone())
            .unwrap_or_default()
    }

    fn execute(
        &self,
        configs: &[PromptSet],
        queries: &[usize],
        seed: u64,
    ) -> anyhow::Result<Vec<Vec<Rollout>>> {
        let examples: Vec<Example> = queries
            .iter()
            .map(|&i| {
                self.dev
                    .get(i)
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("dev query index {i} out of range"))
            })
            .collect::<anyhow::Result<_>>()?;
        let runs = self.run(configs, &examples, seed)?;
        Ok(runs
            .iter()
            .map(|per_cfg| per_cfg.iter().map(to_rollout).collect())
            .collect())
    }

    fn validate(&self, config: &PromptSet, seed: u64) -> anyhow::Result<(Vec<f64>, usize)> {
        if self.validation.is_empty() {
            anyhow::bail!("no validation examples");
        }
        let runs = self.run(std::slice::from_ref(config), &self.validation, seed)?;
        let tokens = runs[0]
            .iter()
            .map(|r| r.result.input_tokens + r.result.output_tokens)
            .sum();
        Ok((runs[0].iter().map(|r| r.score).collect(), tokens))
    }
}
