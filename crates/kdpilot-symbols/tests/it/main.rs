//! kdpilot-symbols integration tests, one binary (see the modules for what each checks).

mod common;
mod end_to_end;
mod http;
mod module_walk;
mod names;
mod pe_pdb;
mod server_trouble;
mod stack_model;
mod store;
mod unwind;
