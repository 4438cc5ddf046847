//! Streaming the logs into a [`Report`]: captures and boots numbered across files, stacks
//! grouped by their frames' names (interned, so memory grows with unique stacks, not hits).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::time::SystemTime;

use kdpilot_capture::record::{EventRecord, FrameRecord};

use crate::driver;
use crate::model::{
    BootCount, BootInfo, DriverInfo, EndedBoot, FileInfo, Note, Outstanding, Pairing, Report,
    StackInfo, Summary, MAX_NOTES,
};
use crate::pipeline::{self, key_frames, CompactHit, Record, NONE};
use crate::timeline::Timeline;
use crate::{ReportError, Warning};

/// Line warnings kept per file; the rest are counted in one more warning.
pub const WARNINGS_PER_FILE: u64 = 20;
/// Distinct tags and ignored kinds kept; more are counted under `(other)`.
const MAX_NAMES: usize = 64;

/// Strings stored once, referred to by number.
#[derive(Default)]
struct Interner {
    ids: HashMap<Box<str>, u32>,
    names: Vec<Box<str>>,
}

impl Interner {
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let id = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        self.names.push(s.into());
        self.ids.insert(s.into(), id);
        id
    }

    fn get(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("?", |s| s)
    }
}

/// What makes two frames the same frame: names and offset, not the address (which moves with
/// every boot). The address is the key only of a frame with neither module nor function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FrameKey {
    module: Option<u32>,
    function: Option<u32>,
    offset: u64,
}

/// A stack's counts while reading.
#[derive(Clone)]
struct StackAcc {
    frames: Box<[u32]>,
    hits: u64,
    bytes: u64,
    min_size: u64,
    max_size: u64,
    first: SystemTime,
    last: SystemTime,
    per_boot: Vec<BootCount>,
    timeline: Timeline,
}

impl StackAcc {
    fn new(frames: Box<[u32]>, time: SystemTime) -> Self {
        StackAcc {
            frames,
            hits: 0,
            bytes: 0,
            min_size: u64::MAX,
            max_size: 0,
            first: time,
            last: time,
            per_boot: Vec::new(),
            timeline: Timeline::default(),
        }
    }

    /// Counts one allocation of `size` bytes at `time` in the report's boot `boot_id`.
    fn add(&mut self, time: SystemTime, size: u64, boot_id: usize) {
        self.hits += 1;
        self.bytes = self.bytes.saturating_add(size);
        self.min_size = self.min_size.min(size);
        self.max_size = self.max_size.max(size);
        self.first = self.first.min(time);
        self.last = self.last.max(time);
        self.timeline.add(time, 1);
        match self.per_boot.last_mut() {
            Some(c) if c.boot == boot_id => {
                c.hits += 1;
                c.bytes = c.bytes.saturating_add(size);
            }
            _ => match self.per_boot.binary_search_by_key(&boot_id, |c| c.boot) {
                Ok(i) => {
                    if let Some(c) = self.per_boot.get_mut(i) {
                        c.hits += 1;
                        c.bytes = c.bytes.saturating_add(size);
                    }
                }
                Err(i) => self.per_boot.insert(
                    i,
                    BootCount {
                        boot: boot_id,
                        hits: 1,
                        bytes: size,
                    },
                ),
            },
        }
    }
}

/// A hit kept for pairing with its `allocated` and `free` records (`--outstanding` only).
struct Alloc {
    stack: u32,
    /// Index into `boots`.
    boot: usize,
    size: u64,
    time: SystemTime,
    /// The learnt address (`None`: no `allocated` record yet).
    address: Option<u64>,
}

/// Pairing state, kept only when asked for ([`Aggregator::track_frees`]).
#[derive(Default)]
struct Tracker {
    /// Hits neither freed nor failed, by (capture, hit number).
    allocs: HashMap<(usize, u64), Alloc>,
    pairing: Pairing,
}

/// Reads logs and adds them up.
pub struct Aggregator {
    threads: usize,
    names: Interner,
    frame_ids: HashMap<FrameKey, u32>,
    frames: Vec<FrameKey>,
    stack_ids: HashMap<Box<str>, u32>,
    stacks: Vec<StackAcc>,

    boot_ids: HashMap<(usize, u64), usize>,
    boots: Vec<BootInfo>,
    capture: usize,
    new_capture_pending: bool,
    link_lost: bool,
    last_hit_number: Option<u64>,
    /// The current capture's first hit of each stack (what `same_stack_as` names), and the
    /// stacks seen in it: bounded by the unique stacks, not the hits.
    first_hit_of_stack: HashMap<u64, u32>,
    stacks_in_capture: HashSet<u32>,
    /// Boots ended by a `reboot` record: index into `boots`, when.
    reboots: HashMap<usize, SystemTime>,
    tracker: Option<Tracker>,
    notes_dropped: u64,

    summary: Summary,
    files: Vec<FileInfo>,
    ignored: BTreeMap<String, u64>,
    warnings: Vec<Warning>,
    notes: Vec<Note>,
}

impl Default for Aggregator {
    fn default() -> Self {
        Aggregator::with_threads(pipeline::default_threads())
    }
}

impl Aggregator {
    /// An aggregator that parses on `threads` threads (1: on the caller's only).
    pub fn with_threads(threads: usize) -> Self {
        Aggregator {
            threads,
            names: Interner::default(),
            frame_ids: HashMap::new(),
            frames: Vec::new(),
            stack_ids: HashMap::new(),
            stacks: Vec::new(),
            boot_ids: HashMap::new(),
            boots: Vec::new(),
            capture: 0,
            new_capture_pending: false,
            link_lost: false,
            last_hit_number: None,
            first_hit_of_stack: HashMap::new(),
            stacks_in_capture: HashSet::new(),
            reboots: HashMap::new(),
            tracker: None,
            notes_dropped: 0,
            summary: Summary {
                max_one_in: 1,
                ..Summary::default()
            },
            files: Vec::new(),
            ignored: BTreeMap::new(),
            warnings: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Keeps every hit until it is freed, to pair hits with their `allocated` and `free`
    /// records ([`Aggregator::finish_outstanding`]). Memory then grows with the hits that are
    /// not freed.
    pub fn track_frees(&mut self) {
        self.tracker.get_or_insert_with(Tracker::default);
    }

    /// Reads one log to its end (see [`crate::read_logs`] for the rules).
    pub fn read_file(&mut self, path: &Path) -> Result<(), ReportError> {
        let open_err = |source| ReportError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        if file.metadata().map_err(open_err)?.is_dir() {
            return Err(open_err(std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "it is a directory",
            )));
        }
        let file_index = self.files.len();
        self.files.push(FileInfo {
            path: path.to_path_buf(),
            ..FileInfo::default()
        });
        self.new_capture_pending = true;
        self.link_lost = false;
        self.last_hit_number = None;

        let mut info = FileInfo {
            path: path.to_path_buf(),
            ..FileInfo::default()
        };
        // An unparseable line without its `\n` can only be the last one: a record in flight
        // (a capture killed while writing it, or still writing it). It is reported as such.
        let mut pending_bad: Option<(u64, String)> = None;
        let mut records = 0u64;
        let reader = BufReader::with_capacity(1 << 20, file);
        let read = pipeline::for_each_line(reader, self.threads, |parsed| {
            info.lines = parsed.number;
            match parsed.line {
                Record::Hit(hit) => {
                    info.hits += 1;
                    records += 1;
                    self.hit(file_index, &hit);
                }
                Record::Event(event) => {
                    info.events += 1;
                    records += 1;
                    self.event(file_index, &event);
                }
                Record::Unknown(kind) => {
                    records += 1;
                    self.summary.ignored_records += 1;
                    count_name(&mut self.ignored, &kind);
                }
                Record::Blank => {}
                Record::Bad(message) if !parsed.terminated => {
                    pending_bad = Some((parsed.number, message));
                }
                Record::Bad(message) => self.bad_line(&mut info, parsed.number, message),
            }
        });
        if let Err((line, source)) = read {
            return Err(ReportError::Read {
                path: path.to_path_buf(),
                line,
                source,
            });
        }
        let complete_bad_lines = info.bad_lines;
        if let Some((line, message)) = pending_bad {
            info.incomplete_last_line = true;
            info.bad_lines += 1;
            self.summary.bad_lines += 1;
            self.warnings.push(Warning {
                file: path.to_path_buf(),
                line: Some(line),
                message: format!(
                    "the last line is not a complete record ({message}): the capture was \
                     killed or is still writing; read up to the record before it"
                ),
            });
        }
        if complete_bad_lines > WARNINGS_PER_FILE {
            let more = complete_bad_lines - WARNINGS_PER_FILE;
            self.warnings.push(Warning {
                file: path.to_path_buf(),
                line: None,
                message: format!("{more} more lines that are not records were skipped"),
            });
        }
        if records == 0 && complete_bad_lines > 0 {
            return Err(ReportError::NotALog {
                path: path.to_path_buf(),
                lines: info.lines,
            });
        }
        if let Some(slot) = self.files.get_mut(file_index) {
            *slot = info;
        }
        Ok(())
    }

    /// Notes a file given more than once (it is read once).
    pub fn duplicate(&mut self, path: &Path) {
        self.warnings.push(Warning {
            file: path.to_path_buf(),
            line: None,
            message: "given more than once; read once".into(),
        });
    }

    fn bad_line(&mut self, info: &mut FileInfo, line: u64, message: String) {
        info.bad_lines += 1;
        self.summary.bad_lines += 1;
        if info.bad_lines <= WARNINGS_PER_FILE {
            self.warnings.push(Warning {
                file: info.path.clone(),
                line: Some(line),
                message: format!("skipped: {message}"),
            });
        }
    }

    fn saw_time(&mut self, t: SystemTime) {
        self.summary.first = Some(self.summary.first.map_or(t, |f| f.min(t)));
        self.summary.last = Some(self.summary.last.map_or(t, |l| l.max(t)));
    }

    fn start_capture_if_pending(&mut self) {
        if self.new_capture_pending || self.capture == 0 {
            self.capture += 1;
            self.new_capture_pending = false;
            self.link_lost = false;
            self.last_hit_number = None;
            self.first_hit_of_stack.clear();
            self.stacks_in_capture.clear();
        }
    }

    /// The index into `boots` of boot `boot` of the current capture, if seen.
    fn known_boot(&self, boot: Option<u64>) -> Option<usize> {
        boot.and_then(|b| self.boot_ids.get(&(self.capture, b)).copied())
    }

    fn note(&mut self, time: SystemTime, boot: Option<usize>, message: String) {
        if self.notes.len() < MAX_NOTES {
            self.notes.push(Note {
                time,
                boot: boot.map(|b| b + 1),
                message,
            });
        } else {
            self.notes_dropped += 1;
        }
    }

    /// The report's number of boot `boot` of the current capture (created when new).
    fn boot_index(&mut self, file: usize, boot: u64, t: SystemTime) -> usize {
        let key = (self.capture, boot);
        let index = match self.boot_ids.get(&key) {
            Some(&i) => i,
            None => {
                let i = self.boots.len();
                self.boots.push(BootInfo {
                    id: i + 1,
                    file,
                    capture: self.capture,
                    boot,
                    ..BootInfo::default()
                });
                self.boot_ids.insert(key, i);
                i
            }
        };
        if let Some(b) = self.boots.get_mut(index) {
            b.first = Some(b.first.map_or(t, |f| f.min(t)));
        }
        index
    }

    fn event(&mut self, file: usize, event: &EventRecord) {
        self.saw_time(event.time());
        match *event {
            EventRecord::Connected { .. } => {
                if self.link_lost {
                    self.link_lost = false;
                } else {
                    self.new_capture_pending = true;
                }
            }
            EventRecord::LinkLost { .. } => self.link_lost = true,
            EventRecord::Detached { .. } => {
                self.new_capture_pending = true;
                self.link_lost = false;
            }
            EventRecord::Boot {
                time,
                boot,
                build,
                kernel_base,
                ..
            } => {
                self.start_capture_if_pending();
                let i = self.boot_index(file, boot, time);
                if let Some(b) = self.boots.get_mut(i) {
                    b.build.get_or_insert(build);
                    b.kernel_base.get_or_insert(kernel_base);
                }
            }
            EventRecord::Armed { time, boot, .. } => {
                self.start_capture_if_pending();
                self.boot_index(file, boot, time);
            }
            EventRecord::Reboot { time, boot, .. } => {
                self.start_capture_if_pending();
                let i = self.boot_index(file, boot, time);
                self.reboots.entry(i).or_insert(time);
            }
            EventRecord::Sampled {
                time,
                boot,
                one_in,
                ref reason,
                skipped,
            } => {
                let boot = self.known_boot(boot);
                self.summary.skipped_hits = self.summary.skipped_hits.saturating_add(skipped);
                self.summary.max_one_in = self.summary.max_one_in.max(one_in);
                let skipped = if skipped > 0 {
                    format!(
                        "; {} hits were resumed without a record before this",
                        crate::format::thousands(skipped)
                    )
                } else {
                    String::new()
                };
                let why = if reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", reason.trim())
                };
                let message = if one_in > 1 {
                    format!(
                        "sampling: from here 1 hit in {one_in} is recorded{why}{skipped}; \
                         the counts are lower than the allocations"
                    )
                } else {
                    format!("sampling ended: every hit is recorded again{why}{skipped}")
                };
                self.note(time, boot, message);
            }
            EventRecord::SpecialPoolExhausted {
                time,
                boot,
                quiet_secs,
                switched,
            } => {
                let boot = self.known_boot(Some(boot));
                self.summary.special_pool_exhausted += 1;
                let then = if switched {
                    "the capture switched to PoolHitTag for the rest of the boot"
                } else {
                    "the capture kept the special-pool breakpoint (--on-exhaustion warn): \
                     allocations of the tag that went to normal pool are not counted"
                };
                let message = format!(
                    "special pool exhausted: no allocation of the tag came from special pool \
                     for {} while the kernel still allocated it; those allocations were not \
                     caught; {then}",
                    crate::format::duration(std::time::Duration::from_secs(quiet_secs))
                );
                self.note(time, boot, message);
            }
            EventRecord::Allocated { hit, address, .. } => {
                let capture = self.capture;
                if let Some(t) = &mut self.tracker {
                    t.pairing.allocated_records += 1;
                    match t.allocs.get_mut(&(capture, hit)) {
                        Some(a) if a.address.is_none() && address == 0 => {
                            t.allocs.remove(&(capture, hit));
                            t.pairing.failed += 1;
                        }
                        Some(a) if a.address.is_none() => {
                            a.address = Some(address);
                            t.pairing.with_address += 1;
                        }
                        _ => t.pairing.unknown_allocated += 1,
                    }
                }
            }
            EventRecord::Free { hit, .. } => {
                let capture = self.capture;
                if let Some(t) = &mut self.tracker {
                    if t.allocs.remove(&(capture, hit)).is_some() {
                        t.pairing.freed += 1;
                    } else {
                        t.pairing.unknown_frees += 1;
                    }
                }
            }
            EventRecord::Warning { .. } => {}
        }
    }

    fn hit(&mut self, file: usize, hit: &CompactHit) {
        self.saw_time(hit.time);
        if self.last_hit_number.is_some_and(|n| hit.hit <= n) {
            self.new_capture_pending = true;
        }
        self.start_capture_if_pending();
        self.last_hit_number = Some(hit.hit);
        let boot = self.boot_index(file, hit.boot, hit.time);
        if let Some(b) = self.boots.get_mut(boot) {
            b.hits += 1;
            b.bytes = b.bytes.saturating_add(hit.size);
        }
        self.summary.hits += 1;
        self.summary.bytes = self.summary.bytes.saturating_add(hit.size);
        count_name(&mut self.summary.tags, hit.tag());

        let id = self.stack_of(hit);
        if let Some(t) = &mut self.tracker {
            t.pairing.hits += 1;
            t.allocs.insert(
                (self.capture, hit.hit),
                Alloc {
                    stack: id,
                    boot,
                    size: hit.size,
                    time: hit.time,
                    address: None,
                },
            );
        }
        if let Some(acc) = self.stacks.get_mut(id as usize) {
            acc.add(hit.time, hit.size, boot + 1);
        }
    }

    /// The stack of `hit`: its frames', or for a `same_stack_as` hit the stack of the hit it
    /// names (a stack of its own saying so when that hit is not in this capture).
    fn stack_of(&mut self, hit: &CompactHit) -> u32 {
        if let Some(first) = hit.same_stack_as {
            self.summary.same_stack_hits += 1;
            if let Some(&id) = self.first_hit_of_stack.get(&first) {
                return id;
            }
            self.summary.same_stack_unresolved += 1;
            let key =
                format!("{NONE}\x1f(unknown: same stack as hit {first}, not in the log)\x1f0\x1e");
            return match self.stack_ids.get(key.as_str()) {
                Some(&id) => id,
                None => self.new_stack(&key, hit.time),
            };
        }
        let id = match self.stack_ids.get(hit.stack_key()) {
            Some(&id) => id,
            None => self.new_stack(hit.stack_key(), hit.time),
        };
        if self.stacks_in_capture.insert(id) {
            self.first_hit_of_stack.insert(hit.hit, id);
        }
        id
    }

    /// Adds the stack with key `key`, seen for the first time at `time`.
    fn new_stack(&mut self, key: &str, time: SystemTime) -> u32 {
        let frames: Box<[u32]> = key_frames(key)
            .map(|(module, function, offset)| self.frame_id(module, function, offset))
            .collect();
        let id = u32::try_from(self.stacks.len()).unwrap_or(u32::MAX);
        self.stack_ids.insert(key.into(), id);
        self.stacks.push(StackAcc::new(frames, time));
        id
    }

    fn frame_id(&mut self, module: Option<&str>, function: Option<&str>, offset: u64) -> u32 {
        let key = FrameKey {
            module: module.map(|m| self.names.intern(m)),
            function: function.map(|n| self.names.intern(n)),
            offset,
        };
        if let Some(&id) = self.frame_ids.get(&key) {
            return id;
        }
        let id = u32::try_from(self.frames.len()).unwrap_or(u32::MAX);
        self.frames.push(key);
        self.frame_ids.insert(key, id);
        id
    }

    /// The frame as `module!function+0xoff` (the capture's own formatting).
    fn frame_text(&self, id: u32) -> String {
        let Some(key) = self.frames.get(id as usize) else {
            return "?".into();
        };
        let (module, function) = (
            key.module.map(|m| self.names.get(m).to_string()),
            key.function.map(|f| self.names.get(f).to_string()),
        );
        let unnamed = module.is_none() && function.is_none();
        FrameRecord {
            address: key.offset,
            module,
            function,
            offset: if unnamed { 0 } else { key.offset },
            child_sp: 0,
            return_address: 0,
            frame_pointer: None,
            args: Vec::new(),
            trust: String::new(),
        }
        .call_site()
    }

    /// The stacks of `accs` as the report shows them, most hits first, ranked from 1.
    fn stack_infos(&self, accs: Vec<StackAcc>) -> Vec<StackInfo> {
        let mut stacks: Vec<StackInfo> = accs
            .into_iter()
            .map(|acc| {
                let modules = acc.frames.iter().map(|&id| {
                    self.frames
                        .get(id as usize)
                        .and_then(|k| k.module)
                        .map(|m| self.names.get(m))
                });
                let (driver_frame, driver) = driver::responsible(modules);
                StackInfo {
                    rank: 0,
                    frames: acc.frames.iter().map(|&id| self.frame_text(id)).collect(),
                    driver: driver.to_string(),
                    driver_frame,
                    hits: acc.hits,
                    bytes: acc.bytes,
                    min_size: acc.min_size.min(acc.max_size),
                    max_size: acc.max_size,
                    first_seen: acc.first,
                    last_seen: acc.last,
                    per_boot: acc.per_boot,
                    timeline: acc.timeline,
                }
            })
            .collect();
        stacks.sort_by(|a, b| {
            b.hits
                .cmp(&a.hits)
                .then(b.bytes.cmp(&a.bytes))
                .then(a.first_seen.cmp(&b.first_seen))
                .then_with(|| a.frames.cmp(&b.frames))
        });
        for (i, s) in stacks.iter_mut().enumerate() {
            s.rank = i + 1;
        }
        stacks
    }

    /// The report.
    pub fn finish(mut self) -> Report {
        // The stacks' keys are no longer needed: free them before the report is built.
        self.stack_ids = HashMap::new();
        let accs = std::mem::take(&mut self.stacks);
        let stacks = self.stack_infos(accs);
        self.into_report(stacks)
    }

    /// A report of `stacks` with this aggregator's files, boots, warnings and notes.
    fn into_report(mut self, stacks: Vec<StackInfo>) -> Report {
        let mut by_bytes: Vec<&StackInfo> = stacks.iter().collect();
        by_bytes.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.rank.cmp(&b.rank)));
        let stacks_by_bytes = by_bytes.iter().map(|s| s.rank).collect();
        let drivers = drivers(&stacks);
        if self.notes_dropped > 0 {
            let last = self.summary.last.unwrap_or(std::time::UNIX_EPOCH);
            self.notes.push(Note {
                time: last,
                boot: None,
                message: format!(
                    "{} more sampling and special-pool records are not listed",
                    self.notes_dropped
                ),
            });
        }
        let summary = Summary {
            boots: self.boots.len(),
            captures: self.capture,
            files: self.files.len(),
            unique_stacks: stacks.len(),
            drivers: drivers.len(),
            ..self.summary
        };
        Report {
            summary,
            files: self.files,
            boots: self.boots,
            drivers,
            stacks,
            stacks_by_bytes,
            ignored: self.ignored,
            warnings: self.warnings,
            notes: self.notes,
        }
    }

    /// The allocations never freed (see [`crate::read_outstanding`]); `None` without
    /// [`Aggregator::track_frees`] or when the logs have no `allocated` record.
    pub fn finish_outstanding(mut self) -> Option<Outstanding> {
        let tracker = self.tracker.take()?;
        if tracker.pairing.allocated_records == 0 {
            return None;
        }
        self.stack_ids = HashMap::new();
        let mut pairing = tracker.pairing;
        let end = self.summary.last;

        // When each boot ended: its reboot, else the next boot of its capture.
        let mut ended: HashMap<usize, Option<SystemTime>> = HashMap::new();
        for (i, b) in self.boots.iter().enumerate() {
            let next = self
                .boots
                .iter()
                .filter(|n| n.capture == b.capture && n.boot > b.boot)
                .min_by_key(|n| n.boot);
            match (self.reboots.get(&i), next) {
                (Some(&t), _) => {
                    ended.insert(i, Some(t));
                }
                (None, Some(n)) => {
                    ended.insert(i, n.first);
                }
                (None, None) => {}
            }
        }

        let mut left: Vec<((usize, u64), Alloc)> = tracker.allocs.into_iter().collect();
        left.sort_by_key(|(key, _)| *key);
        let mut main: BTreeMap<u32, StackAcc> = BTreeMap::new();
        let mut per_ended: BTreeMap<usize, BTreeMap<u32, StackAcc>> = BTreeMap::new();
        let mut boot_counts: HashMap<usize, (u64, u64)> = HashMap::new();
        for (_, a) in left {
            if a.address.is_none() {
                pairing.unpaired += 1;
                continue;
            }
            let Some(frames) = self.stacks.get(a.stack as usize).map(|s| s.frames.clone()) else {
                continue;
            };
            let target = if ended.contains_key(&a.boot) {
                pairing.outstanding_in_ended_boots += 1;
                per_ended.entry(a.boot).or_default()
            } else {
                pairing.outstanding += 1;
                let c = boot_counts.entry(a.boot).or_insert((0, 0));
                c.0 += 1;
                c.1 = c.1.saturating_add(a.size);
                &mut main
            };
            target
                .entry(a.stack)
                .or_insert_with(|| StackAcc::new(frames, a.time))
                .add(a.time, a.size, a.boot + 1);
        }

        let ended_boots = per_ended
            .into_iter()
            .map(|(i, accs)| {
                let stacks = self.stack_infos(accs.into_values().collect());
                let b = self.boots.get(i);
                EndedBoot {
                    boot: i + 1,
                    capture: b.map_or(0, |b| b.capture),
                    log_boot: b.map_or(0, |b| b.boot),
                    ended: ended.get(&i).copied().flatten(),
                    allocations: stacks.iter().map(|s| s.hits).sum(),
                    bytes: stacks.iter().map(|s| s.bytes).fold(0, u64::saturating_add),
                    stacks,
                }
            })
            .collect();
        let stacks = self.stack_infos(main.into_values().collect());
        self.stacks = Vec::new();
        for (i, b) in self.boots.iter_mut().enumerate() {
            let (n, bytes) = boot_counts.get(&i).copied().unwrap_or((0, 0));
            b.hits = n;
            b.bytes = bytes;
        }
        self.summary.hits = pairing.outstanding;
        self.summary.bytes = stacks.iter().map(|s| s.bytes).fold(0, u64::saturating_add);
        let report = self.into_report(stacks);
        Some(Outstanding {
            report,
            end,
            ended_boots,
            pairing,
        })
    }
}

/// The drivers of `stacks`, most hits first.
fn drivers(stacks: &[StackInfo]) -> Vec<DriverInfo> {
    let mut drivers: BTreeMap<&str, DriverInfo> = BTreeMap::new();
    for s in stacks {
        let d = drivers.entry(&s.driver).or_insert_with(|| DriverInfo {
            name: s.driver.clone(),
            hits: 0,
            bytes: 0,
            stacks: 0,
            first_seen: s.first_seen,
            last_seen: s.last_seen,
        });
        d.hits += s.hits;
        d.bytes = d.bytes.saturating_add(s.bytes);
        d.stacks += 1;
        d.first_seen = d.first_seen.min(s.first_seen);
        d.last_seen = d.last_seen.max(s.last_seen);
    }
    let mut drivers: Vec<DriverInfo> = drivers.into_values().collect();
    drivers.sort_by(|a, b| {
        b.hits
            .cmp(&a.hits)
            .then(b.bytes.cmp(&a.bytes))
            .then_with(|| a.name.cmp(&b.name))
    });
    drivers
}

fn count_name(map: &mut BTreeMap<String, u64>, name: &str) {
    if let Some(n) = map.get_mut(name) {
        *n += 1;
    } else if map.len() < MAX_NAMES {
        map.insert(name.to_string(), 1);
    } else {
        *map.entry("(other)".into()).or_insert(0) += 1;
    }
}
