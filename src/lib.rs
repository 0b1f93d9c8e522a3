//! cantante: offline optimization of multi-agent LLM pipelines with CANTANTE
//! (contrastive credit attribution + CAPO per agent, arXiv 2605.13295), running
//! every model call in-process through Candle.
//!
//! Modules follow the data flow: [`llm`] → `prompt` → [`graph`] → `task` →
//! `eval` → `attribution` → `optimize` → `report`; `config` and `cli` sit on top.
#![warn(missing_docs)]

pub mod cli;
pub mod prompt;
pub mod graph;
pub mod llm;
