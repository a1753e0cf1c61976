//! Chaos harness and benchmarks for Shoal.
#![forbid(unsafe_code)]

pub mod faults;
