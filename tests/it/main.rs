//! One integration-test binary (ripgrep style): each module tests one area.

mod benchrun;
mod cli;
mod engine;
mod eval;
mod graph;
mod kernels;
mod optimize;
mod report;
mod sandbox;
mod serve;
mod task;
mod tokenizer;

/// The benchmark data for tests: `$CANTANTE_DATA`, else the repository's
/// `datasets/` once `cantante data fetch` filled it, else `../shared/datasets`
/// (CI's offline copy).
pub fn data_dir() -> std::path::PathBuf {
    if let Some(v) = std::env::var_os("CANTANTE_DATA").filter(|v| !v.is_empty()) {
        return v.into();
    }
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let local = repo.join("datasets");
    if local.join("gsm8k/test.jsonl").is_file() && local.join("mbpp/mbpp.jsonl").is_file() {
        local
    } else {
        repo.join("../shared/datasets")
    }
}
