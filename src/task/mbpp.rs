//! MBPP (Mostly Basic Python Problems): loading, the standard split by task id
//! (test 11–510, validation 511–600, train/dev 601–974, few-shot prompt pool
//! 1–10; Austin et al. 2021), the task text with its example assertions, the
//! per-run code tools and the sandboxed all-tests-pass metric (reference spec
//! §2.3 and §3.2; the reference's dev ⊂ test leakage and its empty
//! `test_cases`, spec §10 items 2 and 5, are fixed here).

use super::sandbox::{run_tests, SandboxLimits};
use super::tools::McodeEnv;
use super::MBPP_ALL;
use super::{seeded_sample, strip_code_fences, Example, Split, Task, TaskError};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::Path;

/// Task ids of the test split.
pub const TEST_IDS: RangeInclusive<u32> = 11..=510;
/// Task ids of the validation split.
pub const VALIDATION_IDS: RangeInclusive<u32> = 511..=600;
/// Task ids of the train split (our `Dev`).
pub const TRAIN_IDS: RangeInclusive<u32> = 601..=974;
/// Task ids of the few-shot prompt pool.
pub const PROMPT_IDS: RangeInclusive<u32> = 1..=10;

/// Name of the initial state variable holding the visible test assertions.
pub const TEST_CASES_VAR: &str = "test_cases";

#[derive(Deserialize)]
struct Record {
    text: String,
    code: String,
    task_id: u32,
    #[serde(default)]
    test_setup_code: String,
    test_list: Vec<String>,
}

/// The MBPP task.
#[derive(Debug, Clone)]
pub struct Mbpp {
    /// (task id, example), sorted by id.
    items: Vec<(u32, Example)>,
    /// Limits for scoring runs.
    limits: SandboxLimits,
}

/// The query shown for an MBPP task: its text, a blank line, and the example
/// assertions as the MBPP paper shows them (so the function name is visible).
pub fn format_query(text: &str, tests: &[String]) -> String {
    format!(
        "{}\n\nYour code should pass these tests:\n\n{}",
        text.trim(),
        tests.join("\n")
    )
}

impl Mbpp {
    /// Load and verify `mbpp/mbpp.jsonl` under `dir`.
    pub fn open(dir: &Path) -> Result<Self, TaskError> {
        let path = dir.join(MBPP_ALL.rel_path);
        let mut items = Vec::new();
        for (lineno, rec) in super::read_jsonl::<Record>(dir, &MBPP_ALL)? {
            if rec.test_list.is_empty() {
                return Err(TaskError::Parse {
                    path: path.clone(),
                    line: lineno,
                    message: format!("task {} has an empty test_list", rec.task_id),
                });
            }
            let ex = Example {
                id: format!("mbpp-{}", rec.task_id),
                query: format_query(&rec.text, &rec.test_list),
                target: rec.code.replace("\r\n", "\n"),
                tests: rec.test_list.clone(),
                visible_tests: rec.test_list,
                setup_code: rec.test_setup_code.replace("\r\n", "\n"),
            };
            items.push((rec.task_id, ex));
        }
        items.sort_by_key(|(id, _)| *id);
        Ok(Self {
            items,
            limits: SandboxLimits::default(),
        })
    }

    /// Use these sandbox limits for scoring and for the tool environments.
    pub fn with_limits(mut self, limits: SandboxLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The sandbox limits in use.
    pub fn limits(&self) -> &SandboxLimits {
        &self.limits
    }

    /// Task ids of a split.
    pub fn split_ids(split: Split) -> RangeInclusive<u32> {
        match split {
            Split::Dev => TRAIN_IDS,
            Split::Validation => VALIDATION_IDS,
            Split::Test => TEST_IDS,
        }
    }

    fn in_range(&self, r: RangeInclusive<u32>) -> Vec<Example> {
        self.items
            .iter()
            .filter(|(id, _)| r.contains(id))
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// The few-shot prompt pool (tasks 1–10), in id order, with reference solutions as targets.
    pub fn prompt_examples(&self) -> Vec<Example> {
        self.in_range(PROMPT_IDS)
    }

    /// The example with MBPP task id `id`, if present.
    pub fn by_id(&self, id: u32) -> Option<&Example> {
        self.items.iter().find(|(i, _)| *i == id).map(|(_, e)| e)
    }
}

/// The code a run submitted: the tool env's last written code if non-empty,
/// else the prediction; markdown fences removed.
pub fn submitted_code(prediction: &str, tools: Option<&dyn crate::graph::ToolEnv>) -> String {
    let from_tools = tools
        .and_then(|t| t.artifact())
        .filter(|c| !c.trim().is_empty());
    strip_code_fences(from_tools.as_deref().unwrap_or(prediction))
}

impl Task for Mbpp {
    fn name(&self) -> &str {
        "mbpp"
    }

    fn load(
        &self,
        split: Split,
        limit: Option<usize>,
        seed: u64,
    ) -> Result<Vec<Example>, TaskError> {
        let pool = self.in_range(Self::split_ids(split));
        Ok(seeded_sample(&pool, "mbpp", split, limit, seed))
    }

    fn initial_state(&self, ex: &Example) -> BTreeMap<String, String> {
        BTreeMap::from([(TEST_CASES_VAR.to_string(), ex.visible_tests.join("\n"))])
    }

    fn provided_vars(&self) -> Vec<String> {
        vec!["query".to_string(), TEST_CASES_VAR.to_string()]
    }

    fn tool_names(&self) -> Vec<String> {
        McodeEnv::TOOLS.iter().map(|s| s.to_string()).collect()
    }

    fn tool_env(&self, ex: &Example) -> Option<Box<dyn crate::graph::ToolEnv>> {
        Some(Box::new(McodeEnv::new(
            ex.visible_tests.clone(),
            ex.setup_code.clone(),
            self.limits.clone(),
        )))
    }

    fn score(
        &self,
        ex: &Example,
        prediction: &str,
        tools: Option<&dyn crate::graph::ToolEnv>,
    ) -> f64 {
        let code = submitted_code(prediction, tools);
        if code.trim().is_empty() || ex.tests.is_empty() {
            return 0.0;
        }
        let report = run_tests(&code, &ex.setup_code, &ex.tests, &self.limits);
        tracing::debug!(id = %ex.id, passed = report.passed(), total = report.total(), "scored MBPP run");
        if report.all_passed() {
            1.0
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::tests::test_data_dir;
    use std::collections::HashSet;

    fn mbpp() -> Mbpp {
        Mbpp::open(&test_data_dir()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn split_ranges_and_sizes() {
        let t = mbpp();
        let sizes: Vec<usize> = [Split::Dev, Split::Validation, Split::Test]
            .iter()
            .map(|s| t.load(*s, None, 1).unwrap().len())
            .collect();
        assert_eq!(sizes, [374, 90, 500]);
        assert_eq!(t.prompt_examples().len(), 10);
        let id = |e: &Example| e.id.trim_start_matches("mbpp-").parse::<u32>().unwrap();
        for (split, r) in [
            (Split::Dev, TRAIN_IDS),
            (Split::Validation, VALIDATION_IDS),
            (Split::Test, TEST_IDS),
        ] {
            for e in t.load(split, Some(40), 9).unwrap() {
                assert!(r.contains(&id(&e)), "{} not in {split}", e.id);
            }
        }
        let dev: HashSet<String> = t
            .load(Split::Dev, None, 3)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert!(t
            .load(Split::Test, None, 3)
            .unwrap()
            .iter()
            .all(|e| !dev.contains(&e.id)));
        assert_eq!(
            t.load(Split::Test, Some(30), 5).unwrap(),
            t.load(Split::Test, Some(30), 5).unwrap()
        );
        assert_ne!(
            t.load(Split::Test, Some(30), 5).unwrap(),
            t.load(Split::Test, Some(30), 6).unwrap()
        );
    }

    #[test]
    fn query_format_shows_tests_and_function_name() {
        let t = mbpp();
        let ex = t.by_id(11).unwrap();
        assert!(
            ex.query
                .starts_with("Write a python function to remove first and last occurrence"),
            "{}",
            ex.query
        );
        assert!(
            ex.query
                .contains("\n\nYour code should pass these tests:\n\nassert remove_Occ("),
            "{}",
            ex.query
        );
        assert_eq!(ex.visible_tests.len(), 3);
        assert_eq!(ex.tests, ex.visible_tests);
        let st = t.initial_state(ex);
        assert_eq!(st[TEST_CASES_VAR], ex.visible_tests.join("\n"));
        assert_eq!(st[TEST_CASES_VAR].lines().count(), 3);
        assert!(t.provided_vars().contains(&"test_cases".to_string()));
        assert_eq!(
            t.tool_names(),
            ["write_code", "read_code", "run_code", "check_tests"]
        );
        // The two records with setup code carry it.
        let with_setup = t
            .items
            .iter()
            .filter(|(_, e)| !e.setup_code.is_empty())
            .count();
        assert_eq!(with_setup, 2);
    }

    #[test]
    fn reference_solutions_score_one_and_wrong_ones_zero() {
        let t = mbpp();
        for id in [11, 12, 601, 511, 367] {
            let ex = t.by_id(id).unwrap();
            let fenced = format!("Here is the code:\n```python\n{}\n```", ex.target);
            assert_eq!(t.score(ex, &fenced, None), 1.0, "reference of {id}");
            assert_eq!(t.score(ex, "def nothing():\n    pass", None), 0.0);
        }
        assert_eq!(t.score(t.by_id(11).unwrap(), "", None), 0.0);
        // The tool env's artifact takes precedence over the prediction.
        let ex = t.by_id(601).unwrap();
        let mut env = t.tool_env(ex).unwrap();
        env.call("write_code", &serde_json::json!({"code": ex.target}));
        assert_eq!(t.score(ex, "garbage", Some(env.as_ref())), 1.0);
        let mut bad = t.tool_env(ex).unwrap();
        bad.call("write_code", &serde_json::json!({"code": "x = 1"}));
        assert_eq!(t.score(ex, &ex.target, Some(bad.as_ref())), 0.0);
    }
}
