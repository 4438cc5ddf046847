//! A simulated Windows kernel debug target that speaks KDCOM like the real kernel does,
//! quirks included (kd-protocol.md): it only polls for the break-in byte while running, sends
//! SYNC ids at boot, answers RESET with a junk id and resends what it was delivering, ACKs and
//! drops duplicates and wrong packet types, consumes breakpoints at every stop, and answers
//! unknown APIs with STATUS_UNSUCCESSFUL.
//!
//! The machine is built from real PE images (or built-in synthetic ones) mapped at KASLR bases
//! that change every boot, with PsLoadedModuleList and KDDEBUGGER_DATA64 laid out in its
//! memory. A workload plugs in as an [`Activity`] that the running kernel polls every tick.
//!
//! It is part of the product (the README's demo runs on it) and the peer of every
//! integration test.

pub mod activity;
pub mod boot;
pub mod callsites;
pub mod frames;
pub mod frames_x86;
pub mod kernel;
pub mod line;
pub mod link;
pub mod loader;
pub mod memory;
pub mod modules;
pub mod pdbmap;
pub mod pe_builder;
pub mod step;
pub mod target;
pub mod workload;

pub use activity::{AllocationActivity, Scenario};
pub use boot::MachineConfig;
pub use kernel::{Cpu, DebugRegisters, Fault, Machine, Phase, Stop, Thread};
pub use line::{FaultyLine, LineModel};
pub use loader::{ImageSource, LoadError, LoadedImage};
pub use target::{
    serve, serve_with, Activity, Chatter, NoActivity, RebootOptions, ScheduledFault, SessionEnd,
    TargetOptions,
};
