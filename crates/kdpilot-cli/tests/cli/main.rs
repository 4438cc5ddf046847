//! Tests of the `kdpilot` binary: output, errors and exit codes. One test binary, small helpers
//! in `util`; snapshots (insta) of what users read.

mod general;
mod pooltag;
mod report;
mod util;
