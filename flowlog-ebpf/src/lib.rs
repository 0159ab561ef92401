//! Empty library: it lets `flowlog-sidecar` name this crate as a build dependency, so cargo
//! rebuilds the agent when the programs change (the programs themselves are in `main.rs`).
#![no_std]
