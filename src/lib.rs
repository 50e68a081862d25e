//! The `choreo` package: the shop's composition and the tools around the runtime (node
//! start-up, simulators, load, verify, demo). `src/main.rs` is only the command line; the
//! benchmark is the `choreo-bench` package in `bench/`, built on this library.

pub mod auth;
pub mod business;
pub mod client;
pub mod contexts;
pub mod demo;
pub mod dlq;
pub mod load;
pub mod procs;
pub mod saga_cli;
pub mod shop;
pub mod sim;
pub mod streams;
pub mod verify;
