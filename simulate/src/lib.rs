//! Chaos harness and benchmarks for Shoal (grows with the simulate issue).
#![forbid(unsafe_code)]

pub mod bench;
