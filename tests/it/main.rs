//! One integration-test binary (ripgrep style): each module tests one area.

mod engine;
mod optimize;
mod sandbox;
mod task;
mod tokenizer;
