//! Integration tests (one binary).

mod optimize;
