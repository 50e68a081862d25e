//! Black-box integration tests: a real nats-server, real `choreo node` processes, real sled
//! files. Each test starts its own server on a free port.

mod backpressure;
mod bad_input;
mod cli;
mod crash;
mod duplicates;
mod failover;
mod failure;
mod faults;
mod harness;
mod observability;
mod order_flow;
mod parent_death;
mod recovery;
mod sagas;
mod security;
mod setup;
mod startup;
mod supervision;
mod verify;
