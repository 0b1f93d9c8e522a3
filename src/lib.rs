//! cantante: offline optimization of multi-agent LLM pipelines with CANTANTE
//! (contrastive credit attribution + CAPO per agent, arXiv 2605.13295), running
//! every model call in-process through Candle.
//!
//! Modules follow the data flow: [`llm`] → [`prompt`] → [`graph`] → [`task`] →
//! [`eval`] → [`attribution`] → [`optimize`] → [`benchrun`] → [`report`]; `cli`
//! sits on top.
#![warn(missing_docs)]

pub mod attribution;
pub mod benchrun;
pub mod cli;
pub mod eval;
pub mod graph;
pub mod llm;
pub mod optimize;
pub mod prompt;
pub mod report;
pub mod serve;
pub mod task;
