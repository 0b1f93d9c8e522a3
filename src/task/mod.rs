//! Benchmark tasks: data loading, seeded split sampling and per-query scoring
//! (reference spec §3 "Tasks, data and scoring", with the §10 fixes the design
//! asks for: numeric GSM8K answers and disjoint MBPP dev/test splits), plus the
//! Python sandbox ([`sandbox`]) and MBPP's code tools ([`tools`], spec §2.3).
//!
//! Data files are read from a local directory (see [`resolve_data_dir`]) and
//! checked against the line counts and SHA-256 sums listed in
//! `datasets/README.md` before use.

pub mod fetch;
pub mod gsm8k;
pub mod mbpp;
pub mod sandbox;
pub mod tools;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub use gsm8k::Gsm8k;
pub use mbpp::Mbpp;

/// Environment variable naming the data directory.
pub const DATA_ENV: &str = "CANTANTE_DATA";

/// Errors raised while loading task data.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The task name is not one of the known benchmarks.
    #[error("unknown task `{0}` (known: gsm8k, mbpp)")]
    UnknownTask(String),
    /// A data file is missing.
    #[error(
        "data file {path} is missing ({hint}); see datasets/README.md for where to get it, \
         or point --data / CANTANTE_DATA at a directory holding it"
    )]
    Missing {
        /// The file that was looked for.
        path: PathBuf,
        /// What the file is.
        hint: String,
    },
    /// A data file exists but does not match its expected size or checksum.
    #[error("data file {path} is corrupt or a different version: {reason}; re-fetch it as described in datasets/README.md")]
    Corrupt {
        /// The file that failed.
        path: PathBuf,
        /// What did not match.
        reason: String,
    },
    /// A data file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A record could not be parsed.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The file that failed.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// One benchmark item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// Stable id, e.g. `gsm8k-train-17` or `mbpp-601`.
    pub id: String,
    /// The task input shown to the MAS (`query` state variable).
    pub query: String,
    /// Gold answer (GSM8K: the text after `####`, commas removed; MBPP: the reference solution).
    pub target: String,
    /// Hidden tests used for scoring (MBPP `test_list`; empty for GSM8K).
    pub tests: Vec<String>,
    /// Tests the agents may see and run (MBPP: the assertions shown in the prompt).
    pub visible_tests: Vec<String>,
    /// Code run before every test (MBPP `test_setup_code`).
    pub setup_code: String,
}

/// A data split.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Optimization data (GSM8K: part of train; MBPP: train ids 601–974).
    Dev,
    /// Held-out data for model selection, disjoint from `Dev`.
    Validation,
    /// Test data (GSM8K: test; MBPP: ids 11–510).
    Test,
}

impl Split {
    /// Lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Split::Dev => "dev",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A benchmark: data splits, initial run state, tools and the metric.
pub trait Task: Send + Sync {
    /// Task name (`gsm8k`, `mbpp`).
    fn name(&self) -> &str;
    /// Seeded sample of up to `limit` examples of a split (deterministic for a seed; None = all).
    /// A smaller limit always gives a prefix of a larger one for the same seed.
    fn load(
        &self,
        split: Split,
        limit: Option<usize>,
        seed: u64,
    ) -> Result<Vec<Example>, TaskError>;
    /// Extra initial state vars for a run (e.g. MBPP `test_cases` = the visible example assertions).
    /// `query` itself is not included: the runner sets it from [`Example::query`].
    fn initial_state(&self, ex: &Example) -> BTreeMap<String, String>;
    /// Names of the state vars this task provides initially (for setup validation);
    /// always includes `query`.
    fn provided_vars(&self) -> Vec<String>;
    /// Tool names this task offers (for setup validation).
    fn tool_names(&self) -> Vec<String>;
    /// A fresh per-run tool environment (None for tasks without tools).
    fn tool_env(&self, ex: &Example) -> Option<Box<dyn crate::graph::ToolEnv>>;
    /// Score a finished run in [0,1].
    fn score(
        &self,
        ex: &Example,
        prediction: &str,
        tools: Option<&dyn crate::graph::ToolEnv>,
    ) -> f64;
}

/// Build the task called `name` (`gsm8k` or `mbpp`), reading data from
/// `data_dir` (resolved with [`resolve_data_dir`]). Files are verified here.
pub fn load_task(name: &str, data_dir: Option<&Path>) -> Result<Box<dyn Task>, TaskError> {
    let dir = resolve_data_dir(data_dir);
    match name.to_ascii_lowercase().as_str() {
        "gsm8k" => Ok(Box::new(Gsm8k::open(&dir)?)),
        "mbpp" => Ok(Box::new(Mbpp::open(&dir)?)),
        _ => Err(TaskError::UnknownTask(name.to_string())),
    }
}

/// The data directory: `explicit` if given, else `$CANTANTE_DATA`, else `datasets/`.
pub fn resolve_data_dir(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    match std::env::var_os(DATA_ENV) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from("datasets"),
    }
}

/// Expected shape of one data file (from `datasets/README.md`).
#[derive(Debug, Clone, Copy)]
pub struct DataFile {
    /// Path relative to the data directory.
    pub rel_path: &'static str,
    /// Number of lines (records).
    pub lines: usize,
    /// Hex SHA-256 of the whole file.
    pub sha256: &'static str,
    /// Human description for error messages.
    pub what: &'static str,
}

/// GSM8K train split.
pub const GSM8K_TRAIN: DataFile = DataFile {
    rel_path: "gsm8k/train.jsonl",
    lines: 7473,
    sha256: "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
    what: "GSM8K train split from openai/grade-school-math",
};
/// GSM8K test split.
pub const GSM8K_TEST: DataFile = DataFile {
    rel_path: "gsm8k/test.jsonl",
    lines: 1319,
    sha256: "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    what: "GSM8K test split from openai/grade-school-math",
};
/// MBPP full file (all 974 tasks).
pub const MBPP_ALL: DataFile = DataFile {
    rel_path: "mbpp/mbpp.jsonl",
    lines: 974,
    sha256: "ccf64ceae9c5403bf50a044cb6d505bfd2a2963ee58338ba268fd65beab92a9f",
    what: "MBPP mbpp.jsonl from google-research/google-research",
};

/// Files already verified in this process (path → ok), so repeated loads are cheap.
static VERIFIED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Read a verified JSONL data file into records, each with its 1-based line
/// number; a record that does not parse is an error naming the file and line.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(
    dir: &Path,
    file: &DataFile,
) -> Result<Vec<(usize, T)>, TaskError> {
    let text = read_verified(dir, file)?;
    let path = dir.join(file.rel_path);
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let rec = serde_json::from_str(line).map_err(|e| TaskError::Parse {
            path: path.clone(),
            line: i + 1,
            message: e.to_string(),
        })?;
        out.push((i + 1, rec));
    }
    Ok(out)
}

/// Read a data file, checking its line count and SHA-256; returns its text.
/// The error names the file and points at `datasets/README.md`.
pub fn read_verified(dir: &Path, file: &DataFile) -> Result<String, TaskError> {
    let path = dir.join(file.rel_path);
    if !path.is_file() {
        return Err(TaskError::Missing {
            path,
            hint: format!("expected {} ({} lines)", file.what, file.lines),
        });
    }
    let bytes = std::fs::read(&path).map_err(|source| TaskError::Io {
        path: path.clone(),
        source,
    })?;
    let already = VERIFIED.lock().map(|s| s.contains(&path)).unwrap_or(false);
    if !already {
        let lines = bytes.iter().filter(|&&b| b == b'\n').count();
        if lines != file.lines {
            return Err(TaskError::Corrupt {
                path,
                reason: format!("{} lines, expected {}", lines, file.lines),
            });
        }
        let sum = hex::encode(Sha256::digest(&bytes));
        if sum != file.sha256 {
            return Err(TaskError::Corrupt {
                path,
                reason: format!("sha256 {sum}, expected {}", file.sha256),
            });
        }
        if let Ok(mut s) = VERIFIED.lock() {
            s.insert(path.clone());
        }
    }
    String::from_utf8(bytes).map_err(|e| TaskError::Corrupt {
        path,
        reason: format!("not UTF-8: {e}"),
    })
}

/// splitmix64: a fixed, platform-independent 64-bit mixer.
pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stable tag for a (task, split) pair mixed into sampling seeds.
fn stream_tag(task: &str, split: Split) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a
    for b in task.bytes().chain([0u8]).chain(split.as_str().bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Seeded permutation prefix of `pool`: deterministic in (seed, task, split),
/// and `limit = n` is always a prefix of `limit = n + 1`.
pub(crate) fn seeded_sample<T: Clone>(
    pool: &[T],
    task: &str,
    split: Split,
    limit: Option<usize>,
    seed: u64,
) -> Vec<T> {
    let mut idx: Vec<usize> = (0..pool.len()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(splitmix64(seed ^ stream_tag(task, split)));
    idx.shuffle(&mut rng);
    let n = limit.unwrap_or(pool.len()).min(pool.len());
    idx[..n].iter().map(|&i| pool[i].clone()).collect()
}

/// Strip markdown code fences (```python … ```) from model output; if fenced
/// blocks exist, their contents are joined, otherwise the text is returned trimmed.
pub fn strip_code_fences(text: &str) -> String {
    let mut blocks: Vec<String> = Vec::new();
    let mut cur: Option<Vec<&str>> = None;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("```") {
            match cur.take() {
                Some(b) => blocks.push(b.join("\n")),
                None => cur = Some(Vec::new()),
            }
        } else if let Some(b) = cur.as_mut() {
            b.push(line);
        }
    }
    // An unterminated fence (e.g. a truncated reply) still counts as code.
    if let Some(b) = cur {
        blocks.push(b.join("\n"));
    }
    if blocks.is_empty() {
        text.trim_matches('\n').trim_end().to_string()
    } else {
        blocks
            .join("\n\n")
            .trim_matches('\n')
            .trim_end()
            .to_string()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The test data directory, in the integration tests' order:
    /// `$CANTANTE_DATA`, else the clone's `datasets/` when `cantante data
    /// fetch` filled it, else `../shared/datasets`. Panics with a clear
    /// message when it is absent (tests needing data must not pass silently).
    pub(crate) fn test_data_dir() -> PathBuf {
        let have =
            |d: &Path| d.join("gsm8k/train.jsonl").is_file() && d.join("mbpp/mbpp.jsonl").is_file();
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = match std::env::var_os(DATA_ENV) {
            Some(v) if !v.is_empty() => PathBuf::from(v),
            _ if have(&repo.join("datasets")) => repo.join("datasets"),
            _ => repo.join("../shared/datasets"),
        };
        assert!(
            have(&dir),
            "test data not found in {}: run `cantante data fetch` (or ./setup.sh), set CANTANTE_DATA, or place the datasets at ../shared/datasets (see datasets/README.md)",
            dir.display()
        );
        dir
    }

    #[test]
    fn resolve_prefers_explicit() {
        assert_eq!(
            resolve_data_dir(Some(Path::new("/x/y"))),
            PathBuf::from("/x/y")
        );
    }

    #[test]
    fn missing_file_error_names_file_and_readme() {
        let d = tempfile::tempdir().unwrap();
        let err = read_verified(d.path(), &GSM8K_TRAIN).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("gsm8k/train.jsonl"), "{msg}");
        assert!(msg.contains("datasets/README.md"), "{msg}");
        assert!(matches!(err, TaskError::Missing { .. }));
    }

    #[test]
    fn corrupt_file_is_detected() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("mbpp")).unwrap();
        std::fs::write(d.path().join("mbpp/mbpp.jsonl"), "{}\n{}\n").unwrap();
        let err = read_verified(d.path(), &MBPP_ALL).unwrap_err();
        assert!(matches!(err, TaskError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("2 lines, expected 974"), "{err}");
        // Right line count, wrong bytes: caught by the checksum.
        let body = "{}\n".repeat(974);
        std::fs::write(d.path().join("mbpp/mbpp.jsonl"), body).unwrap();
        let err = read_verified(d.path(), &MBPP_ALL).unwrap_err();
        assert!(err.to_string().contains("sha256"), "{err}");
    }

    #[test]
    fn real_files_verify() {
        let dir = test_data_dir();
        for f in [&GSM8K_TRAIN, &GSM8K_TEST, &MBPP_ALL] {
            read_verified(&dir, f).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn unknown_task_is_an_error() {
        assert!(matches!(
            load_task("hotpot", Some(Path::new("/nonexistent"))),
            Err(TaskError::UnknownTask(_))
        ));
    }

    #[test]
    fn sampling_is_deterministic_and_prefix_stable() {
        let pool: Vec<u32> = (0..100).collect();
        let a = seeded_sample(&pool, "t", Split::Dev, Some(10), 7);
        let b = seeded_sample(&pool, "t", Split::Dev, Some(10), 7);
        let c = seeded_sample(&pool, "t", Split::Dev, Some(20), 7);
        let d = seeded_sample(&pool, "t", Split::Dev, Some(10), 8);
        assert_eq!(a, b);
        assert_eq!(&c[..10], &a[..]);
        assert_ne!(a, d);
        let all = seeded_sample(&pool, "t", Split::Dev, None, 7);
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, pool);
        assert_eq!(
            seeded_sample(&pool, "t", Split::Dev, Some(1000), 7).len(),
            100
        );
    }

    #[test]
    fn fences_are_stripped() {
        assert_eq!(
            strip_code_fences("```python\ndef f():\n    return 1\n```"),
            "def f():\n    return 1"
        );
        assert_eq!(strip_code_fences("Here:\n```\nx = 1\n```\nDone."), "x = 1");
        assert_eq!(strip_code_fences("def g(): pass\n"), "def g(): pass");
        assert_eq!(strip_code_fences("```py\nx = 2\n"), "x = 2");
        assert_eq!(
            strip_code_fences("```\na = 1\n```\ntext\n```python\nb = 2\n```"),
            "a = 1\n\nb = 2"
        );
    }
}
