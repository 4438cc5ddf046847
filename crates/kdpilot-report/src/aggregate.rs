//! Streaming the logs into a [`Report`]: captures and boots numbered across files, stacks
//! grouped by their frames' names (interned, so memory grows with unique stacks, not hits).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::time::SystemTime;

use kdpilot_capture::record::{EventRecord, FrameRecord};

use crate::driver;
use crate::model::{BootCount, BootInfo, DriverInfo, FileInfo, Report, StackInfo, Summary};
use crate::pipeline::{self, key_frames, CompactHit, Record};
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

    summary: Summary,
    files: Vec<FileInfo>,
    ignored: BTreeMap<String, u64>,
    warnings: Vec<Warning>,
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
            summary: Summary::default(),
            files: Vec::new(),
            ignored: BTreeMap::new(),
            warnings: Vec::new(),
        }
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
            EventRecord::Armed { time, boot, .. } | EventRecord::Reboot { time, boot, .. } => {
                self.start_capture_if_pending();
                self.boot_index(file, boot, time);
            }
            EventRecord::Warning { .. }
            | EventRecord::Sampled { .. }
            | EventRecord::Allocated { .. }
            | EventRecord::Free { .. }
            | EventRecord::SpecialPoolExhausted { .. } => {}
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

        let id = match self.stack_ids.get(hit.stack_key()) {
            Some(&id) => id,
            None => self.new_stack(hit),
        };
        let Some(acc) = self.stacks.get_mut(id as usize) else {
            return;
        };
        acc.hits += 1;
        acc.bytes = acc.bytes.saturating_add(hit.size);
        acc.min_size = acc.min_size.min(hit.size);
        acc.max_size = acc.max_size.max(hit.size);
        acc.first = acc.first.min(hit.time);
        acc.last = acc.last.max(hit.time);
        acc.timeline.add(hit.time, 1);
        let boot_id = boot + 1;
        match acc.per_boot.last_mut() {
            Some(c) if c.boot == boot_id => {
                c.hits += 1;
                c.bytes = c.bytes.saturating_add(hit.size);
            }
            _ => match acc.per_boot.binary_search_by_key(&boot_id, |c| c.boot) {
                Ok(i) => {
                    if let Some(c) = acc.per_boot.get_mut(i) {
                        c.hits += 1;
                        c.bytes = c.bytes.saturating_add(hit.size);
                    }
                }
                Err(i) => acc.per_boot.insert(
                    i,
                    BootCount {
                        boot: boot_id,
                        hits: 1,
                        bytes: hit.size,
                    },
                ),
            },
        }
    }

    /// Adds the stack of `hit`, seen for the first time.
    fn new_stack(&mut self, hit: &CompactHit) -> u32 {
        let key = hit.stack_key();
        let frames: Box<[u32]> = key_frames(key)
            .map(|(module, function, offset)| self.frame_id(module, function, offset))
            .collect();
        let id = u32::try_from(self.stacks.len()).unwrap_or(u32::MAX);
        self.stack_ids.insert(key.into(), id);
        self.stacks.push(StackAcc {
            frames,
            hits: 0,
            bytes: 0,
            min_size: u64::MAX,
            max_size: 0,
            first: hit.time,
            last: hit.time,
            per_boot: Vec::new(),
            timeline: Timeline::default(),
        });
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

    /// The report.
    pub fn finish(mut self) -> Report {
        // The stacks' keys are no longer needed: free them before the report is built.
        self.stack_ids = HashMap::new();
        let accs = std::mem::take(&mut self.stacks);
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
        let mut by_bytes: Vec<&StackInfo> = stacks.iter().collect();
        by_bytes.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.rank.cmp(&b.rank)));
        let stacks_by_bytes = by_bytes.iter().map(|s| s.rank).collect();

        let mut drivers: BTreeMap<&str, DriverInfo> = BTreeMap::new();
        for s in &stacks {
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
        }
    }
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
