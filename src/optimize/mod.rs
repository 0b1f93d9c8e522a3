//! The CANTANTE optimizer (paper §3, reference spec §4): one local prompt
//! optimizer per agent (CAPO by default, EvoPrompt-GA as an ablation), joint
//! configurations run at one barrier per round, contrastive credit attribution
//! per query, and per-agent racing on those credits.
//!
//! One round is the paper's four steps, each a small function in [`run`]:
//! **propose** (every agent's optimizer writes candidates through the
//! meta-LLM), **execute** (candidates combined into joint configurations, all
//! run on one seeded block of dev queries in one [`Executor::execute`] call),
//! **attribute** (per query, groups of rollouts contrasted by the attributer),
//! **update** (each optimizer races its candidates on their credits). The
//! per-agent best prompts are then combined and validated as a whole.
//!
//! The graph runtime is reached only through the [`Executor`] seam, and every
//! other model call through [`crate::llm::Llm`], so the whole loop is tested
//! with scripted models. Budget accounting is in [`budget`], checkpoints and
//! resume in [`checkpoint`] and [`run`].

pub mod analysis;
pub mod budget;
pub mod capo;
pub mod checkpoint;
pub mod design;
pub mod edit;
pub mod evoprompt;
pub mod mas;
pub mod meta;
pub mod run;
pub mod simulate;

pub use crate::attribution::Rollout;
pub use budget::{dry_run, DryRun, StopReason, TokenCounters};
pub use design::Design;
pub use run::{
    attribute_only, optimize, rank_agents, resume, resume_with_config, AttributionReport,
    OptimizeResult, ProgressEvent, RoundRecord, RunHooks,
};

use crate::graph::{AgentSpec, PromptSet};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The seam between the optimizer and the MAS runtime. The lead implements it
/// over the real graph runtime; tests implement it with scripted fakes.
pub trait Executor: Sync {
    /// The MAS setup (agents, their variables and initial prompt pools).
    fn setup(&self) -> &crate::graph::Setup;
    /// Number of dev queries available, indexed `0..n`.
    fn num_dev(&self) -> usize;
    /// Text of dev query `idx` (shown to the attributer).
    fn query_text(&self, idx: usize) -> String;
    /// Run every configuration on every query index: `result[c][q]`. `seed` is
    /// the rollout seed base (the executor derives a per-run seed from it, so
    /// a rollout depends only on (configuration, query, seed)).
    fn execute(
        &self,
        configs: &[PromptSet],
        queries: &[usize],
        seed: u64,
    ) -> anyhow::Result<Vec<Vec<Rollout>>>;
    /// Score of one configuration on every validation item (in the
    /// validation set's order, the same for every configuration), and the
    /// task tokens it cost.
    fn validate(&self, config: &PromptSet, seed: u64) -> anyhow::Result<(Vec<f64>, usize)>;
}

/// Errors of the optimizer.
#[derive(Debug, thiserror::Error)]
pub enum OptimizeError {
    /// The executor failed.
    #[error("executor: {0:#}")]
    Executor(anyhow::Error),
    /// The executor returned a result of the wrong shape.
    #[error("executor returned {got} for {expected}")]
    Shape {
        /// What was expected.
        expected: String,
        /// What came back.
        got: String,
    },
    /// A meta-LLM call failed.
    #[error("meta LLM: {0}")]
    Llm(#[from] crate::llm::LlmError),
    /// The attributer failed.
    #[error("attribution: {0}")]
    Attribution(#[from] crate::attribution::AttributionError),
    /// The setup cannot be optimized (e.g. an agent without prompts).
    #[error("setup: {0}")]
    Setup(String),
    /// An invalid configuration value.
    #[error("config field `{field}`: {message}")]
    Config {
        /// The offending field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A file of the run directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A file of the run directory could not be (de)serialized.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: String,
        /// What failed.
        message: String,
    },
}

/// Why a round did not complete: a clean stop (budget) or an error.
#[derive(Debug)]
pub enum Interrupt {
    /// Stop cleanly, recording the reason.
    Stop(StopReason),
    /// Abort with an error.
    Error(OptimizeError),
}

impl From<OptimizeError> for Interrupt {
    fn from(e: OptimizeError) -> Self {
        Interrupt::Error(e)
    }
}

/// Which LLM attributer assigns the per-agent credits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttributerKind {
    /// The paper's attributer: a generated JSON verdict per group (for
    /// strong or remote models).
    Llm,
    /// Closed 1–5 questions per agent and rollout, credit from the label
    /// probabilities ([`crate::attribution::JudgeAttributer`]; for small local models).
    Judge,
}

impl std::str::FromStr for AttributerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "llm" => Ok(Self::Llm),
            "judge" => Ok(Self::Judge),
            _ => Err(format!("unknown attributer `{s}` (expected llm or judge)")),
        }
    }
}

/// Which local optimizer each agent runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// CAPO racing (the method).
    Capo,
    /// EvoPrompt-GA (ablation, spec §4.5).
    Evoprompt,
}

/// Every hyper-parameter of a run. Defaults reproduce the reference's
/// settings (spec §5) where they exist.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizeConfig {
    /// Run seed; every random choice is derived from it.
    pub seed: u64,
    /// Maximum number of rounds.
    pub rounds: usize,
    /// Dev queries per round (one block).
    pub block_size: usize,
    /// Rollouts per attribution group (incumbent included).
    pub group_size: usize,
    /// Significance level of the one-sided paired t-test.
    pub alpha: f64,
    /// Length penalty weight (× candidate tokens / longest initial prompt tokens).
    pub length_penalty: f64,
    /// Maximum racing blocks per race (CAPO step).
    pub max_blocks: usize,
    /// Crossovers (each followed by a mutation) per proposal.
    pub crossovers_per_round: usize,
    /// CAPO: extra offspring per proposal made without the meta-LLM by
    /// deleting one sentence of a population member ([`edit`]; GrIPS's
    /// `del`, an extension beyond the paper). 0 = the paper's CAPO.
    pub edit_deletions: usize,
    /// CAPO: extra offspring per proposal made without the meta-LLM by
    /// filling a population member's `{few_shots}` placeholder with 1 to
    /// `max_shots` worked examples: the agent's own replies in dev rollouts
    /// that scored full marks ([`edit::shot_records`]; CAPO's example
    /// selection, run as an ablation in the paper). 0 = off.
    pub edit_shots: usize,
    /// Most worked examples one few-shot offspring carries.
    pub max_shots: usize,
    /// Longest worked example, in characters (longer ones are not used).
    pub max_shot_chars: usize,
    /// Population size k; `None` = the agent's initial pool size.
    pub population: Option<usize>,
    /// Cap on total tokens (task + meta); `None` = unlimited.
    pub max_total_tokens: Option<u64>,
    /// Cap on task tokens (rollouts and validation).
    pub max_task_tokens: Option<u64>,
    /// Cap on meta tokens (attribution and rewriting).
    pub max_meta_tokens: Option<u64>,
    /// Token cap of each field shown to the attributer.
    pub attribution_field_cap: usize,
    /// Maximum new tokens of an attributer reply.
    pub attribution_max_new_tokens: usize,
    /// Attributer sampling temperature.
    pub attribution_temperature: f64,
    /// Maximum new tokens of a mutation/crossover reply.
    pub meta_max_new_tokens: usize,
    /// Meta-LLM sampling temperature.
    pub meta_temperature: f64,
    /// Use the identity attributer (ablation) instead of the LLM attributer
    /// (with the `ofat` design the credits are then the plain score
    /// differences, without tie refinement; the paper's ablation is `joint`).
    pub identity_attribution: bool,
    /// Which LLM attributer assigns credits (when not the identity ablation).
    pub attributer: AttributerKind,
    /// The judge attributer's minimum probability on its labels for a
    /// credit to count (below it the credit is missing).
    pub judge_min_coverage: f64,
    /// Layout of each round's configurations: `joint` (the paper: candidate
    /// i of every agent together, credits from the attributer) or `ofat` (one
    /// agent changed at a time, credits = exact score differences).
    pub design: Design,
    /// `ofat`: at most this many candidates per agent (besides its incumbent)
    /// run per round; `None` = all of them.
    pub ofat_max_candidates: Option<usize>,
    /// `ofat`, and `joint` with `joint_split`: weight of the attributer's
    /// judgement where a candidate's score ties the incumbent's (0 = no
    /// attributer call under `ofat`; below 1 a real score difference always
    /// dominates).
    pub ofat_tie_weight: f64,
    /// `joint`: anchor credits on the score difference to the incumbent and
    /// let the attributer only split it between the changed agents
    /// ([`design::split_credits`]) instead of using its credits directly.
    pub joint_split: bool,
    /// Local optimizer per agent.
    pub optimizer: OptimizerKind,
    /// Estimated completion tokens per agent call (for budget projections
    /// before any rollout has been measured).
    pub task_max_new_tokens_estimate: usize,
    /// Estimated validation rollouts (for the dry-run projection only).
    pub validation_size_estimate: usize,
    /// Significance gate on the validation (an extension beyond the paper):
    /// a round's validated configuration replaces the best one only when its
    /// per-item gain passes a one-sided sign test at this level
    /// ([`capo::sign_test_greater`] over the items where the two differ), not
    /// merely when its mean is higher. `None` = the paper's rule (a higher
    /// mean wins).
    pub validation_alpha: Option<f64>,
    /// CAPO (an extension beyond the paper): the incumbent keeps its place
    /// after a race unless a candidate ranked above it clearly beat it, i.e.
    /// won more of their shared queries than it lost by more than
    /// `ofat_tie_weight` (`ofat`) or by any credit (`joint`). Ties, a shorter
    /// prompt or the attributer's refinement of a tie then never replace it.
    /// `false` = the paper's rule (the best mean penalised credit leads).
    pub sticky_incumbent: bool,
}

impl Default for OptimizeConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            rounds: 10,
            block_size: 10,
            group_size: 3,
            alpha: 0.2,
            length_penalty: 0.05,
            max_blocks: 5,
            crossovers_per_round: 3,
            edit_deletions: 0,
            edit_shots: 0,
            max_shots: 2,
            max_shot_chars: 1200,
            population: None,
            max_total_tokens: None,
            max_task_tokens: None,
            max_meta_tokens: None,
            attribution_field_cap: 256,
            attribution_max_new_tokens: 1024,
            attribution_temperature: 0.1,
            meta_max_new_tokens: 1024,
            meta_temperature: 0.1,
            identity_attribution: false,
            attributer: AttributerKind::Judge,
            judge_min_coverage: 0.5,
            design: Design::Ofat,
            ofat_max_candidates: None,
            ofat_tie_weight: 0.25,
            joint_split: false,
            optimizer: OptimizerKind::Capo,
            task_max_new_tokens_estimate: 512,
            validation_size_estimate: 50,
            validation_alpha: None,
            sticky_incumbent: false,
        }
    }
}

impl OptimizeConfig {
    /// Check value ranges; the error names the field.
    pub fn validate(&self) -> Result<(), OptimizeError> {
        let bad = |field: &str, message: &str| {
            Err(OptimizeError::Config {
                field: field.into(),
                message: message.into(),
            })
        };
        if !(0.0..=1.0).contains(&self.judge_min_coverage) {
            return bad("judge_min_coverage", "must be in [0, 1]");
        }
        if matches!(self.validation_alpha, Some(a) if !(a > 0.0 && a <= 1.0)) {
            return bad("validation_alpha", "must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.ofat_tie_weight) {
            return bad("ofat_tie_weight", "must be in [0, 1]");
        }
        if self.ofat_max_candidates == Some(0) {
            return bad("ofat_max_candidates", "must be at least 1");
        }
        if self.block_size == 0 {
            return bad("block_size", "must be at least 1");
        }
        if self.group_size < 2 {
            return bad(
                "group_size",
                "must be at least 2 (attribution contrasts rollouts)",
            );
        }
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            return bad("alpha", "must be in (0, 1)");
        }
        if !(self.length_penalty >= 0.0 && self.length_penalty.is_finite()) {
            return bad("length_penalty", "must be a finite number >= 0");
        }
        if self.max_blocks == 0 {
            return bad("max_blocks", "must be at least 1");
        }
        if self.population == Some(0) {
            return bad("population", "must be at least 1");
        }
        if self.edit_shots > 0 && self.max_shots == 0 {
            return bad("max_shots", "must be at least 1 when edit_shots > 0");
        }
        if self.meta_max_new_tokens == 0 {
            return bad("meta_max_new_tokens", "must be at least 1");
        }
        Ok(())
    }
}

/// One meta-LLM job of a proposal phase: the full meta-prompt and its seed.
#[derive(Clone, Debug, PartialEq)]
pub struct MetaJob {
    /// The rendered meta-prompt.
    pub prompt: String,
    /// Seed of the request (a regeneration uses a seed derived from it).
    pub seed: u64,
    /// The templates the job rewrites (one to mutate, two to cross over):
    /// the generated prompt is checked against them
    /// ([`meta::prompt_problems`]).
    pub sources: Vec<String>,
}

/// What a local optimizer knows about its agent when proposing.
#[derive(Clone, Copy)]
pub struct AgentContext<'a> {
    /// The agent.
    pub agent: &'a AgentSpec,
    /// Run seed.
    pub run_seed: u64,
    /// Current round (1-based).
    pub round: usize,
    /// The run configuration.
    pub config: &'a OptimizeConfig,
    /// The meta-LLM (its tokenizer measures prompt lengths).
    pub llm: &'a dyn crate::llm::Llm,
    /// Worked examples available to few-shot offspring (empty unless
    /// `edit_shots` > 0 and some dev rollout scored full marks).
    pub shots: &'a [edit::Shot],
}

impl AgentContext<'_> {
    /// A seed derived from (run seed, round, agent, purpose, index).
    pub fn seed(&self, purpose: &str, index: u64) -> u64 {
        derive_seed(
            self.run_seed,
            &[
                tag(purpose),
                self.round as u64,
                tag(&self.agent.name),
                index,
            ],
        )
    }
}

/// Per-query credits of one candidate prompt in one round: (query index, credit).
pub type QueryCredits = Vec<(usize, Option<f64>)>;

/// Which candidates of a capped round run first: the fewest credited
/// evaluations, then the newest (an offspring before an untested prompt of
/// the initial pool). Ordered so that the smaller value runs first.
pub type RunPriority = (usize, std::cmp::Reverse<usize>);

/// A per-agent prompt optimizer driven by the round loop: proposals come in
/// phases of batched meta-LLM jobs; evaluations come back as per-query credits.
pub trait LocalOptimizer {
    /// Next proposal phase. `phase` starts at 0; `outputs` are the validated
    /// prompts produced for the previous phase's jobs (`None` = rejected).
    /// Returns the jobs of this phase, or `None` when the proposal is complete
    /// (the optimizer has absorbed its new candidates).
    fn propose_phase(
        &mut self,
        phase: usize,
        outputs: &[Option<String>],
        ctx: &AgentContext,
    ) -> Option<Vec<MetaJob>>;
    /// Prompts to evaluate this round, in a fixed order.
    fn candidates_to_run(&self) -> Vec<String>;
    /// Run priority of each prompt of [`Self::candidates_to_run`] (parallel
    /// to it; lower runs first), for rounds that run only some of them
    /// (`ofat_max_candidates`). Default: all equal, so the round's shuffle
    /// alone decides which run.
    fn run_priority(&self) -> Vec<RunPriority> {
        vec![RunPriority::default(); self.candidates_to_run().len()]
    }
    /// Feed this round's credits (`evals[i]` belongs to `candidates_to_run()[i]`).
    fn update(&mut self, round: usize, evals: &[QueryCredits], ctx: &AgentContext);
    /// The agent's current best prompt.
    fn incumbent(&self) -> String;
    /// The current population, best first.
    fn population(&self) -> Vec<String>;
}

/// The local optimizer of one agent (serializable for checkpoints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum AgentOptimizer {
    /// CAPO.
    Capo(capo::Capo),
    /// EvoPrompt-GA.
    Evoprompt(evoprompt::EvoPrompt),
}

impl AgentOptimizer {
    /// Check internal consistency (after loading a checkpoint).
    pub fn check(&self) -> Result<(), String> {
        match self {
            AgentOptimizer::Capo(o) => o.check(),
            AgentOptimizer::Evoprompt(o) if o.members.is_empty() => Err("empty population".into()),
            AgentOptimizer::Evoprompt(_) => Ok(()),
        }
    }
}

impl LocalOptimizer for AgentOptimizer {
    fn propose_phase(
        &mut self,
        phase: usize,
        outputs: &[Option<String>],
        ctx: &AgentContext,
    ) -> Option<Vec<MetaJob>> {
        match self {
            AgentOptimizer::Capo(o) => o.propose_phase(phase, outputs, ctx),
            AgentOptimizer::Evoprompt(o) => o.propose_phase(phase, outputs, ctx),
        }
    }
    fn candidates_to_run(&self) -> Vec<String> {
        match self {
            AgentOptimizer::Capo(o) => o.candidates_to_run(),
            AgentOptimizer::Evoprompt(o) => o.candidates_to_run(),
        }
    }
    fn run_priority(&self) -> Vec<RunPriority> {
        match self {
            AgentOptimizer::Capo(o) => o.run_priority(),
            AgentOptimizer::Evoprompt(o) => o.run_priority(),
        }
    }
    fn update(&mut self, round: usize, evals: &[QueryCredits], ctx: &AgentContext) {
        match self {
            AgentOptimizer::Capo(o) => o.update(round, evals, ctx),
            AgentOptimizer::Evoprompt(o) => o.update(round, evals, ctx),
        }
    }
    fn incumbent(&self) -> String {
        match self {
            AgentOptimizer::Capo(o) => o.incumbent(),
            AgentOptimizer::Evoprompt(o) => o.incumbent(),
        }
    }
    fn population(&self) -> Vec<String> {
        match self {
            AgentOptimizer::Capo(o) => o.population(),
            AgentOptimizer::Evoprompt(o) => o.population(),
        }
    }
}

/// FNV-1a hash of a string: a stable tag for seed derivation.
pub fn tag(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Stable seed derivation from a base seed and a path of parts (splitmix64
/// chaining; never depends on batch composition or platform hashers).
pub fn derive_seed(base: u64, parts: &[u64]) -> u64 {
    let mut h = splitmix64(base);
    for p in parts {
        h = splitmix64(h ^ splitmix64(*p));
    }
    h
}

/// A ChaCha8 RNG for a derived seed.
pub fn rng_for(base: u64, parts: &[u64]) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(derive_seed(base, parts))
}

/// Content hash of a joint configuration (hex SHA-256 prefix of its JSON).
pub fn config_hash(config: &PromptSet) -> String {
    use sha2::{Digest, Sha256};
    let json = serde_json::to_string(config).unwrap_or_default();
    hex::encode(&Sha256::digest(json.as_bytes())[..12])
}

/// Content hash of one prompt.
pub fn prompt_hash(prompt: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(prompt.as_bytes())[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_stable_and_distinct() {
        assert_eq!(derive_seed(42, &[1, 2, 3]), derive_seed(42, &[1, 2, 3]));
        assert_ne!(derive_seed(42, &[1, 2, 3]), derive_seed(42, &[1, 3, 2]));
        assert_ne!(derive_seed(42, &[1]), derive_seed(43, &[1]));
        assert_eq!(tag("a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn config_defaults_and_validation() {
        let c = OptimizeConfig::default();
        assert_eq!(
            (
                c.block_size,
                c.group_size,
                c.max_blocks,
                c.crossovers_per_round
            ),
            (10, 3, 5, 3)
        );
        assert!(c.validate().is_ok());
        let c2: OptimizeConfig = serde_json::from_str("{\"alpha\": 0.1}").unwrap();
        assert_eq!(c2.alpha, 0.1);
        assert_eq!(c2.block_size, 10);
        let bad = OptimizeConfig {
            group_size: 1,
            ..Default::default()
        };
        match bad.validate() {
            Err(OptimizeError::Config { field, .. }) => assert_eq!(field, "group_size"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(serde_json::from_str::<OptimizeConfig>("{\"alpah\": 0.1}").is_err());
    }
}
