//! The Rust API for workers: take listeners by name, accept connections in every mode.
//!
//! SKELETON: to be written by the dispatch work.
