//! End-to-end tests: the KD client against the simulated target, in one test binary.
//! Everything runs in-process over `tokio::io::duplex` (or loopback), bounded in time.

mod capture;
mod client_sim;
mod leaks;
mod line_damage;
mod support;
mod symbol_trouble;
mod workload;
