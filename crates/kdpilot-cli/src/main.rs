//! The kdpilot command-line tool.
fn main() {}
