//! The kdpilot capture workflow: catch every allocation of one pool tag on a Windows target
//! over KD, unattended, through reboots, and write each one with its stack.
//!
//! - [`record`]: what a capture writes: [`record::HitRecord`] (one allocation and its frames),
//!   [`record::EventRecord`] (connected, boot, armed, reboot, link lost, detached, warnings,
//!   sampling), and [`record::LogLine`] to read a JSON-lines log back.
//! - [`log`]: the text log and the JSON-lines log ([`log::LogSink`]): append-only, one write
//!   per record, synced, repaired after a crash; the default paths (`--log`, `--json`).
//!
//! - [`strategy`]: where to break (special pool, PoolHitTag, a breakpoint), chosen from the kernel.
//! - [`engine`]: the capture loop over one KD link: arm, record every hit, step over and re-arm,
//!   follow reboots, detach cleanly; it emits events and never prints.
//!
//! The formats are documented in docs/capture-log.md.

pub mod cost;
pub mod engine;
pub mod log;
pub mod record;
pub mod strategy;
