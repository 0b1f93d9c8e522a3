//! cantante: offline optimization of multi-agent LLM pipelines with CANTANTE
//! (contrastive credit attribution + CAPO per agent, arXiv 2605.13295), running
//! every model call in-process through Candle.
//!
//! Modules follow the data flow: [`llm`] → `prompt` → [`graph`] → [`task`] →
//! `eval` → [`attribution`] → [`optimize`] → `report`; `config` and `cli` sit on top.
#![warn(missing_docs)]

pub mod llm;
pub mod graph;
pub mod task;
pub mod attribution;
pub mod optimize;
pub mod cli;
