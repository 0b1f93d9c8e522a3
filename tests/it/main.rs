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
