//! `cantante data fetch`: download GSM8K and MBPP from their pinned upstream
//! sources (the commits in `datasets/README.md`), verify the same line counts
//! and SHA-256 sums the loaders check, and write them into the data
//! directory. Idempotent: a file that is already there and verified is kept.
//!
//! `CANTANTE_DATA_MIRROR` (or `--mirror`) replaces the upstream URLs with
//! `<mirror>/<relative path>` (e.g. `<mirror>/gsm8k/test.jsonl`), for
//! air-gapped users with an internal mirror. A file is written only after it
//! verified (through a temporary file and a rename), so a failed or corrupt
//! download never leaves a bad file behind.

use super::{read_verified, DataFile, TaskError, GSM8K_TEST, GSM8K_TRAIN, MBPP_ALL};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Environment variable naming a mirror base URL.
pub const MIRROR_ENV: &str = "CANTANTE_DATA_MIRROR";

/// A data file and its pinned upstream URL.
#[derive(Debug, Clone, Copy)]
pub struct Source {
    /// The file's expected shape.
    pub file: DataFile,
    /// Where it comes from.
    pub url: &'static str,
}

/// Every data file the tasks read.
pub const SOURCES: [Source; 3] = [
    Source {
        file: GSM8K_TRAIN,
        url: "https://raw.githubusercontent.com/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/train.jsonl",
    },
    Source {
        file: GSM8K_TEST,
        url: "https://raw.githubusercontent.com/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/test.jsonl",
    },
    Source {
        file: MBPP_ALL,
        url: "https://raw.githubusercontent.com/google-research/google-research/30adf0ec5f35f9609c2f1d896005e184195d9146/mbpp/mbpp.jsonl",
    },
];

/// Errors of a data fetch.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The download failed (offline, HTTP error, unreadable body).
    #[error("cannot download {url} (for {file}): {message}")]
    Download {
        /// URL tried.
        url: String,
        /// File it was for.
        file: String,
        /// What went wrong.
        message: String,
    },
    /// The downloaded bytes are not the expected file.
    #[error("{url} (for {file}) is not the expected file: {reason}; nothing was written")]
    Mismatch {
        /// URL tried.
        url: String,
        /// File it was for.
        file: String,
        /// Line count or checksum difference.
        reason: String,
    },
    /// Writing into the data directory failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// File.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// It was there and verified: not downloaded again.
    Cached(PathBuf),
    /// Downloaded from this URL and verified.
    Downloaded(PathBuf, String),
}

/// The URL of `src`, under `mirror` when given.
pub fn url_of(src: &Source, mirror: Option<&str>) -> String {
    match mirror {
        Some(m) => format!("{}/{}", m.trim_end_matches('/'), src.file.rel_path),
        None => src.url.to_string(),
    }
}

/// Check downloaded bytes against the expected file (a missing final newline,
/// as upstream MBPP has, is added first).
pub fn verify_bytes(file: &DataFile, mut bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    if bytes.last().is_some_and(|&b| b != b'\n') {
        bytes.push(b'\n');
    }
    let lines = bytes.iter().filter(|&&b| b == b'\n').count();
    if lines != file.lines {
        return Err(format!("{lines} lines, expected {}", file.lines));
    }
    let sum = hex::encode(Sha256::digest(&bytes));
    if sum != file.sha256 {
        return Err(format!("sha256 {sum}, expected {}", file.sha256));
    }
    Ok(bytes)
}

/// Fetch every missing or unverified data file into `dir`; `mirror`
/// overrides the upstream URLs. Stops at the first failure.
pub fn fetch_all(dir: &Path, mirror: Option<&str>) -> Result<Vec<Fetched>, FetchError> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(300))
        .build();
    let mut out = Vec::new();
    for src in &SOURCES {
        let path = dir.join(src.file.rel_path);
        if read_verified(dir, &src.file).is_ok() {
            out.push(Fetched::Cached(path));
            continue;
        }
        let url = url_of(src, mirror);
        let name = path.display().to_string();
        let dl = |message: String| FetchError::Download {
            url: url.clone(),
            file: name.clone(),
            message,
        };
        let resp = agent.get(&url).call().map_err(|e| match e {
            ureq::Error::Status(code, _) => dl(format!("HTTP {code}")),
            ureq::Error::Transport(t) => dl(format!("{t} (offline? set {MIRROR_ENV} to a mirror)")),
        })?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut resp.into_reader(), &mut bytes)
            .map_err(|e| dl(format!("reading the body: {e}")))?;
        let bytes = verify_bytes(&src.file, bytes).map_err(|reason| FetchError::Mismatch {
            url: url.clone(),
            file: name.clone(),
            reason,
        })?;
        let parent = path.parent().unwrap_or(dir);
        let werr = |source| FetchError::Write {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(parent).map_err(werr)?;
        let tmp = parent.join(format!(".{}.part", src.file.rel_path.replace('/', "_")));
        std::fs::write(&tmp, &bytes).map_err(werr)?;
        std::fs::rename(&tmp, &path).map_err(werr)?;
        out.push(Fetched::Downloaded(path, url));
    }
    Ok(out)
}

/// Whether every data file in `dir` is present and verified (names the first that is not).
pub fn check_all(dir: &Path) -> Result<(), TaskError> {
    for src in &SOURCES {
        read_verified(dir, &src.file)?;
    }
    Ok(())
}
