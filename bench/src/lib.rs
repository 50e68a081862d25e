//! The benchmark of the example shop (`choreo-bench`, run by `make bench`): the whole shop
//! on this machine, driven at full speed and at fixed rates, measured end to end, by stage,
//! in CPU and memory, and against the host it ran on. It lives outside the `choreo` package
//! so the product crate ships no measuring tools; it starts the shop's processes with the
//! `choreo` binary (`choreo::shop`).
//!
//! Modules, lowest first: [`layout`] (which contexts each node process hosts), [`host`] (the
//! host probe and the machine's CPU), [`stages`] (latency by stage, read back from the
//! streams), [`report`] (the JSON report, the comparison with a baseline, the table) and
//! [`run`] (the phases).

pub mod host;
pub mod layout;
pub mod report;
pub mod run;
pub mod stages;
