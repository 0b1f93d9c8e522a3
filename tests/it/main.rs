//! One integration-test binary (ripgrep style): each module tests one area.

mod graph;
