//! The report as data: what [`crate::read_logs`] returns and every renderer reads.
//!
//! Times are `SystemTime`s; the JSON form writes them as RFC 3339 UTC with milliseconds, like
//! the capture log.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::Serialize;

use crate::timeline::Timeline;
use crate::Warning;

/// Everything a report says.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// The totals.
    pub summary: Summary,
    /// The input files, in the order given.
    pub files: Vec<FileInfo>,
    /// Every boot seen, numbered from 1 across captures and files in the order they were read.
    pub boots: Vec<BootInfo>,
    /// The responsible drivers, most hits first.
    pub drivers: Vec<DriverInfo>,
    /// Every unique stack, most hits first: `stacks[0]` is stack #1.
    pub stacks: Vec<StackInfo>,
    /// Stack numbers (`StackInfo::rank`) in the order of bytes requested, most first.
    pub stacks_by_bytes: Vec<usize>,
    /// Records skipped because this version does not know their kind (a newer capture's new
    /// events), by kind.
    pub ignored: BTreeMap<String, u64>,
    /// What was wrong with the input, up to a bound per file (see [`FileInfo::bad_lines`]).
    pub warnings: Vec<Warning>,
    /// What the capture said about its own completeness: sampling (`sampled` records) and
    /// special pool running out (`special_pool_exhausted`), in log order, up to
    /// [`MAX_NOTES`] (then one more that counts the rest).
    pub notes: Vec<Note>,
}

/// The most [`Note`]s a report keeps.
pub const MAX_NOTES: usize = 50;

/// Something the capture recorded that makes the counts incomplete: sampling began or changed,
/// hits were resumed without a record, special pool ran out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Note {
    /// When (the record's time).
    #[serde(serialize_with = "ser::time")]
    pub time: SystemTime,
    /// The report's boot number ([`BootInfo::id`]), when the record names a boot.
    pub boot: Option<usize>,
    /// What happened and what it means for the counts.
    pub message: String,
}

/// The totals of a report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Hits (allocations caught).
    pub hits: u64,
    /// Bytes requested by those allocations.
    pub bytes: u64,
    /// Boots seen (with or without hits).
    pub boots: usize,
    /// Captures seen: a new capture starts with each file, each `connected` event that does not
    /// follow a `link_lost`, after each `detached`, and where hit numbers go back.
    pub captures: usize,
    /// Input files.
    pub files: usize,
    /// Unique stacks (grouped by `module!function+offset`).
    pub unique_stacks: usize,
    /// Responsible drivers.
    pub drivers: usize,
    /// The earliest record's time.
    #[serde(serialize_with = "ser::time_opt")]
    pub first: Option<SystemTime>,
    /// The latest record's time.
    #[serde(serialize_with = "ser::time_opt")]
    pub last: Option<SystemTime>,
    /// Pool tags of the hits, with their counts.
    pub tags: BTreeMap<String, u64>,
    /// Records skipped because of their kind (the sum of [`Report::ignored`]).
    pub ignored_records: u64,
    /// Lines that were not records (including incomplete last lines).
    pub bad_lines: u64,
    /// Hits of `same_stack_as` records (the capture's per-stack cap was reached): counted
    /// under the stack of the hit they name.
    pub same_stack_hits: u64,
    /// Of those, hits whose named hit is not in the log (a log cut at the start): counted
    /// under a stack of their own, `(unknown: same stack as hit N, not in the log)`.
    pub same_stack_unresolved: u64,
    /// The most hits in one that were recorded at a time (`sampled` records' `one_in`): 1
    /// when every hit was recorded.
    pub max_one_in: u64,
    /// Hits the capture resumed without a record while sampling (the sum of the `sampled`
    /// records' `skipped`).
    pub skipped_hits: u64,
    /// `special_pool_exhausted` records: special pool ran out, hits of the tag went
    /// uncaught for a while.
    pub special_pool_exhausted: u64,
}

/// One input file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FileInfo {
    /// The path as given.
    pub path: PathBuf,
    /// Lines read.
    pub lines: u64,
    /// Hits read.
    pub hits: u64,
    /// Events read.
    pub events: u64,
    /// Lines that were not records.
    pub bad_lines: u64,
    /// The last line was not a complete record (the capture was killed, or is still writing).
    pub incomplete_last_line: bool,
}

/// One boot of a target.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BootInfo {
    /// The report's boot number, from 1, across captures and files.
    pub id: usize,
    /// Index into [`Report::files`] of the file where it was first seen.
    pub file: usize,
    /// The capture it belongs to, from 1.
    pub capture: usize,
    /// Its number in that capture (the log's `boot`).
    pub boot: u64,
    /// The Windows build, from the `boot` event.
    pub build: Option<u32>,
    /// The kernel's base address, from the `boot` event. JSON: a `"0x..."` string.
    #[serde(serialize_with = "ser::hex_opt")]
    pub kernel_base: Option<u64>,
    /// The first record of this boot.
    #[serde(serialize_with = "ser::time_opt")]
    pub first: Option<SystemTime>,
    /// Hits in this boot.
    pub hits: u64,
    /// Bytes requested in this boot.
    pub bytes: u64,
}

/// A driver and the hits of the stacks it is responsible for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DriverInfo {
    /// The module name, or a label: `(kernel)`, `(unknown module)`, `(no frames)`.
    pub name: String,
    /// Hits.
    pub hits: u64,
    /// Bytes requested.
    pub bytes: u64,
    /// Unique stacks.
    pub stacks: usize,
    /// The first hit.
    #[serde(serialize_with = "ser::time")]
    pub first_seen: SystemTime,
    /// The last hit.
    #[serde(serialize_with = "ser::time")]
    pub last_seen: SystemTime,
}

/// A unique stack and its hits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StackInfo {
    /// Its number: 1 for the stack with the most hits.
    pub rank: usize,
    /// The frames, innermost first, as `module!function+0xoff` (docs/report.md: grouping).
    pub frames: Vec<String>,
    /// The responsible driver (or a label, see [`DriverInfo::name`]).
    pub driver: String,
    /// The index in `frames` of the driver's frame.
    pub driver_frame: Option<usize>,
    /// Hits.
    pub hits: u64,
    /// Bytes requested.
    pub bytes: u64,
    /// The smallest request.
    pub min_size: u64,
    /// The largest request.
    pub max_size: u64,
    /// The first hit.
    #[serde(serialize_with = "ser::time")]
    pub first_seen: SystemTime,
    /// The last hit.
    #[serde(serialize_with = "ser::time")]
    pub last_seen: SystemTime,
    /// Hits per boot, in boot order, only boots with hits.
    pub per_boot: Vec<BootCount>,
    /// Hits over time (not in the JSON form).
    #[serde(skip)]
    pub timeline: Timeline,
}

/// What `kdpilot report --outstanding` reports: the allocations that were never freed, by stack
/// ([`crate::read_outstanding`], docs/report.md).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Outstanding {
    /// The outstanding allocations of the boots still running at the end of the log (the last
    /// boot of each capture, unless a reboot ended it), as a report of their own: a stack's
    /// `hits` are its outstanding allocations, `bytes` their sizes, `first_seen` the oldest
    /// and `last_seen` the newest; `summary.hits` and `summary.bytes` the totals, `boots`
    /// the outstanding allocations per boot. Files, warnings and notes are the whole logs'.
    pub report: Report,
    /// The end of the logs: the time of the last record. Ages are measured to it.
    #[serde(serialize_with = "ser::time_opt")]
    pub end: Option<SystemTime>,
    /// Boots that ended (a reboot) with allocations outstanding, in boot order. Their
    /// allocations are gone with the reboot; they are not in [`Outstanding::report`].
    pub ended_boots: Vec<EndedBoot>,
    /// How hits, allocations and frees were paired.
    pub pairing: Pairing,
}

/// The allocations outstanding when a boot ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndedBoot {
    /// The report's boot number ([`BootInfo::id`]).
    pub boot: usize,
    /// The capture it belongs to, from 1.
    pub capture: usize,
    /// Its number in that capture (the log's `boot`).
    pub log_boot: u64,
    /// When it ended: its `reboot` record, else the first record of the next boot.
    #[serde(serialize_with = "ser::time_opt")]
    pub ended: Option<SystemTime>,
    /// Allocations outstanding when it ended.
    pub allocations: u64,
    /// Their bytes.
    pub bytes: u64,
    /// By stack, most allocations first (ranks within this boot; `per_boot` and the timeline
    /// as for [`StackInfo`]).
    pub stacks: Vec<StackInfo>,
}

/// How hits were paired with `allocated` and `free` records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Pairing {
    /// Hits read.
    pub hits: u64,
    /// `allocated` records read.
    pub allocated_records: u64,
    /// Hits with a learnt address (an `allocated` record with an address other than 0).
    pub with_address: u64,
    /// Hits whose allocation failed (`allocated` with address 0): nothing to free.
    pub failed: u64,
    /// Hits freed (a `free` record for the hit).
    pub freed: u64,
    /// Allocations outstanding in the boots still running at the end (the main table).
    pub outstanding: u64,
    /// Allocations outstanding when their boot ended (a reboot).
    pub outstanding_in_ended_boots: u64,
    /// Hits without a learnt address that were not freed either: they cannot be paired and
    /// are in no table (the capture did not track frees, or the return was never seen).
    pub unpaired: u64,
    /// `free` records whose hit is not in the log (or was freed already): ignored.
    pub unknown_frees: u64,
    /// `allocated` records whose hit is not in the log (or was paired already): ignored.
    pub unknown_allocated: u64,
}

/// Hits of a stack in one boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BootCount {
    /// The report's boot number ([`BootInfo::id`]).
    pub boot: usize,
    /// Hits.
    pub hits: u64,
    /// Bytes requested.
    pub bytes: u64,
}

impl Report {
    /// Stack number `rank` (from 1).
    pub fn stack(&self, rank: usize) -> Option<&StackInfo> {
        rank.checked_sub(1).and_then(|i| self.stacks.get(i))
    }

    /// The earliest and latest hit, when there are hits.
    pub fn hit_span(&self) -> Option<(SystemTime, SystemTime)> {
        let first = self.stacks.iter().map(|s| s.first_seen).min()?;
        let last = self.stacks.iter().map(|s| s.last_seen).max()?;
        Some((first, last))
    }
}

/// Serde helpers for times.
pub(crate) mod ser {
    use std::time::SystemTime;

    use kdpilot_capture::record::format_rfc3339;

    pub fn time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_rfc3339(*t))
    }

    pub fn hex_opt<S: serde::Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(&format_args!("{v:#x}")),
            None => s.serialize_none(),
        }
    }

    pub fn time_opt<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => time(t, s),
            None => s.serialize_none(),
        }
    }
}
