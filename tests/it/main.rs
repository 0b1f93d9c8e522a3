//! One integration-test binary (ripgrep style): each module tests one area.

mod engine;
mod sandbox;
mod task;
mod tokenizer;
