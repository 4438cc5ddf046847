//! The two logs of a capture: the text log people read ([`TextLog`]) and the JSON-lines log
//! programs read ([`JsonLog`]), written together through a [`LogSink`].
//!
//! Rules (docs/capture-log.md):
//! - Both files are opened for append and never truncated; a missing file is created.
//! - Each record (a hit, an event) is formatted completely first, then written with one
//!   `write_all`, flushed and, by default, `sync_data`ed ([`LogOptions::sync_data`]).
//! - A record cut off by a crash (`kill -9`, power loss) is repaired when the file is opened
//!   again: the JSON log is cut back to the end of its last complete line (the record in flight
//!   is dropped, so every line parses; a last line that is a whole JSON object and only lacks its
//!   `\n` is kept and ended); the text log gets a `\n` so the next record starts on a fresh line
//!   (the partial text is kept for the reader).
//! - One writer per file: two captures appending to the same log interleave whole records
//!   (`O_APPEND`) but each one's crash repair assumes it is alone.
//! - A failed write (a full disk) is returned as a [`LogError`] naming the file, and the file is
//!   cut back to its length before the write, so a later record does not land after half a line.

use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::record::{format_text_time, Arch, EventRecord, FrameRecord, HitRecord, LogLine};

/// kd's variable for a log file it appends to; `--log`'s first default.
pub const ENV_LOG_FILE_APPEND: &str = "_NT_DEBUG_LOG_FILE_APPEND";
/// kd's variable for a log file it truncates (kdpilot appends to it all the same);
/// `--log`'s second default.
pub const ENV_LOG_FILE_OPEN: &str = "_NT_DEBUG_LOG_FILE_OPEN";

/// How the logs are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogOptions {
    /// `sync_data` after every record, so a power loss or a host crash loses at most the record
    /// being written. On by default; off trades that for speed (the data still reaches the
    /// operating system at once, so a crash of kdpilot alone loses nothing).
    pub sync_data: bool,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions { sync_data: true }
    }
}

/// A log file could not be opened, repaired or written.
#[derive(Debug)]
pub struct LogError {
    path: PathBuf,
    action: &'static str,
    source: io::Error,
}

impl LogError {
    fn new(path: &Path, action: &'static str, source: io::Error) -> Self {
        LogError {
            path: path.to_path_buf(),
            action,
            source,
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What was being done: `open`, `repair`, `append to`, `sync`.
    pub fn action(&self) -> &'static str {
        self.action
    }

    /// The I/O error's kind.
    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }

    /// The I/O error.
    pub fn io_error(&self) -> &io::Error {
        &self.source
    }

    /// The disk (or the user's quota) is full: free space, or point `--log`/`--json` at
    /// another disk.
    pub fn is_storage_full(&self) -> bool {
        // ENOSPC, EDQUOT; ERROR_DISK_FULL, ERROR_HANDLE_DISK_FULL on Windows.
        let raw = self.source.raw_os_error();
        self.source.kind() == io::ErrorKind::StorageFull
            || (cfg!(unix) && matches!(raw, Some(28) | Some(122)))
            || (cfg!(windows) && matches!(raw, Some(112) | Some(39)))
    }
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot {} the log {}: {}",
            self.action,
            self.path.display(),
            self.source
        )?;
        if self.is_storage_full() {
            f.write_str(" (free some space, or give --log/--json a path on another disk)")?;
        }
        Ok(())
    }
}

impl std::error::Error for LogError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl From<LogError> for io::Error {
    fn from(e: LogError) -> Self {
        io::Error::new(e.source.kind(), e)
    }
}

/// What opening a log found at the end of an existing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tail {
    /// Empty, or ends with `\n`.
    Clean,
    /// Ended in the middle of a line.
    Partial,
}

/// An append-only file written a record at a time.
#[derive(Debug)]
struct AppendFile {
    file: File,
    path: PathBuf,
    sync_data: bool,
    bytes_written: u64,
    records_written: u64,
}

impl AppendFile {
    fn open(path: &Path, sync_data: bool) -> Result<AppendFile, LogError> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| LogError::new(path, "open", e))?;
        if !existed && sync_data {
            sync_parent_dir(path);
        }
        Ok(AppendFile {
            file,
            path: path.to_path_buf(),
            sync_data,
            bytes_written: 0,
            records_written: 0,
        })
    }

    /// Writes one complete record: a single `write_all`, then flush and (if set) `sync_data`.
    /// A failed write cuts the file back to where it was.
    fn append(&mut self, record: &[u8]) -> Result<(), LogError> {
        let before = self
            .file
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len());
        if let Err(e) = self.file.write_all(record).and_then(|()| self.file.flush()) {
            if let Some(len) = before {
                // Best effort: take back a partial record so the file ends on a line boundary.
                let _ = self.file.set_len(len);
            }
            return Err(LogError::new(&self.path, "append to", e));
        }
        if self.sync_data {
            self.file
                .sync_data()
                .map_err(|e| LogError::new(&self.path, "sync", e))?;
        }
        self.bytes_written += record.len() as u64;
        self.records_written += 1;
        Ok(())
    }
}

/// Makes a new file's directory entry durable (Unix; elsewhere the file's own sync does).
fn sync_parent_dir(path: &Path) {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if let Ok(dir) = File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Looks at the end of an existing regular file; for `cut`, truncates a partial last line
/// (everything after the last `\n`, or the whole file without one) and returns the bytes cut.
fn inspect_tail(path: &Path, cut: bool, sync_data: bool) -> Result<(Tail, u64), LogError> {
    let err = |e| LogError::new(path, "repair", e);
    let mut file = match OpenOptions::new().read(true).write(cut).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Tail::Clean, 0)),
        Err(e) => return Err(LogError::new(path, "open", e)),
    };
    let meta = file.metadata().map_err(err)?;
    let len = meta.len();
    if !meta.is_file() || len == 0 {
        return Ok((Tail::Clean, 0));
    }
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1)).map_err(err)?;
    file.read_exact(&mut last).map_err(err)?;
    if last[0] == b'\n' {
        return Ok((Tail::Clean, 0));
    }
    if !cut {
        return Ok((Tail::Partial, 0));
    }
    // Find the last '\n', reading backwards in chunks.
    let mut end = len;
    let mut keep = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start)).map_err(err)?;
        file.read_exact(chunk).map_err(err)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            keep = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    // A last line that is a complete JSON object and only lacks its '\n' (written by another
    // tool) is kept and ended.
    if len - keep <= 1 << 20 {
        let mut rest = vec![0u8; (len - keep) as usize];
        file.seek(SeekFrom::Start(keep)).map_err(err)?;
        file.read_exact(&mut rest).map_err(err)?;
        if serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&rest).is_ok() {
            file.seek(SeekFrom::End(0)).map_err(err)?;
            file.write_all(b"\n").map_err(err)?;
            if sync_data {
                file.sync_data().map_err(err)?;
            }
            return Ok((Tail::Clean, 0));
        }
    }
    file.set_len(keep).map_err(err)?;
    if sync_data {
        file.sync_data().map_err(err)?;
    }
    Ok((Tail::Partial, len - keep))
}

/// The JSON-lines log: one JSON object per line, hits without an `event` key, events with one.
#[derive(Debug)]
pub struct JsonLog {
    out: AppendFile,
    dropped_partial_line: Option<u64>,
}

impl JsonLog {
    /// Opens (or creates) `path` for append. If the file ends in the middle of a line (a writer
    /// was killed mid-record), that partial line is cut off first, so the next record starts
    /// right after the last complete one; [`JsonLog::dropped_partial_line`] says how many bytes
    /// went. A last line that parses as a JSON object and only lacks its `\n` is kept and ended.
    pub fn open(path: &Path, options: &LogOptions) -> Result<JsonLog, LogError> {
        let (tail, cut) = inspect_tail(path, true, options.sync_data)?;
        let out = AppendFile::open(path, options.sync_data)?;
        Ok(JsonLog {
            out,
            dropped_partial_line: (tail == Tail::Partial).then_some(cut),
        })
    }

    /// Appends a hit.
    pub fn write_hit(&mut self, hit: &HitRecord) -> Result<(), LogError> {
        self.write(hit)
    }

    /// Appends an event.
    pub fn write_event(&mut self, event: &EventRecord) -> Result<(), LogError> {
        self.write(event)
    }

    /// Appends a hit or an event.
    pub fn write_line(&mut self, line: &LogLine) -> Result<(), LogError> {
        self.write(line)
    }

    fn write<T: serde::Serialize>(&mut self, record: &T) -> Result<(), LogError> {
        let line = json_line(record).map_err(|e| LogError::new(&self.out.path, "append to", e))?;
        self.out.append(&line)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.out.path
    }

    /// The bytes of an incomplete last line cut off at open, if there was one.
    pub fn dropped_partial_line(&self) -> Option<u64> {
        self.dropped_partial_line
    }

    /// Bytes appended since open.
    pub fn bytes_written(&self) -> u64 {
        self.out.bytes_written
    }

    /// Records appended since open.
    pub fn records_written(&self) -> u64 {
        self.out.records_written
    }

    /// Turns `sync_data` after each record on or off.
    pub fn set_sync_data(&mut self, on: bool) {
        self.out.sync_data = on;
    }
}

/// A record as its JSON log line, `\n` included.
pub fn json_line<T: serde::Serialize + ?Sized>(record: &T) -> io::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(record).map_err(io::Error::from)?;
    line.push(b'\n');
    Ok(line)
}

/// The text log: a header line and `kb`-style frames per hit, one line per event, markers
/// (`=== ... ===`) for boots, arming and reboots.
#[derive(Debug)]
pub struct TextLog {
    out: AppendFile,
    ended_partial_line: bool,
}

impl TextLog {
    /// Opens (or creates) `path` for append. If the file ends in the middle of a line, a `\n` is
    /// appended first so the next record starts on a fresh line
    /// ([`TextLog::ended_partial_line`]).
    pub fn open(path: &Path, options: &LogOptions) -> Result<TextLog, LogError> {
        let (tail, _) = inspect_tail(path, false, options.sync_data)?;
        let mut out = AppendFile::open(path, options.sync_data)?;
        let ended_partial_line = tail == Tail::Partial;
        if ended_partial_line {
            out.append(b"\n")?;
            out.bytes_written = 0;
            out.records_written = 0;
        }
        Ok(TextLog {
            out,
            ended_partial_line,
        })
    }

    /// Appends a hit block ([`format_hit_text`]).
    pub fn write_hit(&mut self, hit: &HitRecord) -> Result<(), LogError> {
        self.out.append(format_hit_text(hit).as_bytes())
    }

    /// Appends an event's line(s) ([`format_event_text`]).
    pub fn write_event(&mut self, event: &EventRecord) -> Result<(), LogError> {
        self.out.append(format_event_text(event).as_bytes())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.out.path
    }

    /// The file ended in the middle of a line at open (a `\n` was added).
    pub fn ended_partial_line(&self) -> bool {
        self.ended_partial_line
    }

    /// Bytes appended since open (the repair's `\n` not counted).
    pub fn bytes_written(&self) -> u64 {
        self.out.bytes_written
    }

    /// Turns `sync_data` after each record on or off.
    pub fn set_sync_data(&mut self, on: bool) {
        self.out.sync_data = on;
    }
}

/// Both logs, written together.
#[derive(Debug)]
pub struct LogSink {
    text: TextLog,
    json: JsonLog,
}

impl LogSink {
    /// Opens the text log and the JSON log (see [`TextLog::open`], [`JsonLog::open`]). Paths
    /// naming the same file are refused.
    pub fn open(text: &Path, json: &Path, options: &LogOptions) -> Result<LogSink, LogError> {
        if same_file(text, json) {
            return Err(LogError::new(
                json,
                "open",
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "it is also the text log {}; give --json another path",
                        text.display()
                    ),
                ),
            ));
        }
        let text = TextLog::open(text, options)?;
        let json = JsonLog::open(json, options)?;
        Ok(LogSink { text, json })
    }

    /// Writes a hit to the JSON log, then to the text log. Both are tried; the first error is
    /// returned.
    pub fn write_hit(&mut self, hit: &HitRecord) -> Result<(), LogError> {
        let json = self.json.write_hit(hit);
        let text = self.text.write_hit(hit);
        json.and(text)
    }

    /// Writes an event to the JSON log, then to the text log. Both are tried; the first error
    /// is returned.
    pub fn write_event(&mut self, event: &EventRecord) -> Result<(), LogError> {
        let json = self.json.write_event(event);
        let text = self.text.write_event(event);
        json.and(text)
    }

    /// The text log.
    pub fn text(&self) -> &TextLog {
        &self.text
    }

    /// The JSON log.
    pub fn json(&self) -> &JsonLog {
        &self.json
    }

    /// Turns `sync_data` after each record on or off for both logs.
    pub fn set_sync_data(&mut self, on: bool) {
        self.text.set_sync_data(on);
        self.json.set_sync_data(on);
    }
}

/// The last hit of a capture that did not finish (no `detached` event after it) in the JSON
/// log at `path`: a capture started after a crash or `kill -9` of the previous one hands it to
/// [`crate::engine::Capture::set_unfinished_hit`], so that the stop of that hit, which the
/// kernel reports again, is not recorded twice. Reads at most the last 1 MiB; `None` when
/// the file is missing, ends with `detached`, or has no hit there.
pub fn unfinished_hit(path: &Path) -> Option<HitRecord> {
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let start = len.saturating_sub(1 << 20);
    file.seek(SeekFrom::Start(start)).ok()?;
    let mut tail = Vec::new();
    file.take(1 << 20).read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    for line in text.lines().rev() {
        match LogLine::parse(line) {
            Ok(LogLine::Hit(h)) => return Some(h),
            Ok(LogLine::Event(EventRecord::Detached { .. })) => return None,
            _ => {}
        }
    }
    None
}

fn same_file(a: &Path, b: &Path) -> bool {
    if a == b {
        return true;
    }
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => {
            // Not both existing yet: compare the canonical parents and the names.
            let split = |p: &Path| -> Option<(PathBuf, OsString)> {
                let name = p.file_name()?.to_os_string();
                let parent = match p.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                Some((parent.canonicalize().ok()?, name))
            };
            matches!((split(a), split(b)), (Some(x), Some(y)) if x == y)
        }
    }
}

/// The `--log` and `--json` paths: `log`, else `_NT_DEBUG_LOG_FILE_APPEND`, else
/// `_NT_DEBUG_LOG_FILE_OPEN` (which kd truncates; kdpilot appends to it like to any log), else
/// `kdpilot-YYYYMMDD-HHMMSS.log` (UTC, now) in the current directory; `json`, else the log's
/// path with the extension `.jsonl`. Empty variables count as unset.
pub fn resolve_log_paths(log: Option<PathBuf>, json: Option<PathBuf>) -> (PathBuf, PathBuf) {
    resolve_log_paths_with(log, json, |k| std::env::var_os(k), SystemTime::now())
}

/// [`resolve_log_paths`] with the environment and the clock given.
pub fn resolve_log_paths_with(
    log: Option<PathBuf>,
    json: Option<PathBuf>,
    env: impl Fn(&str) -> Option<OsString>,
    now: SystemTime,
) -> (PathBuf, PathBuf) {
    let from_env = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let log = log
        .or_else(|| from_env(ENV_LOG_FILE_APPEND))
        .or_else(|| from_env(ENV_LOG_FILE_OPEN))
        .unwrap_or_else(|| default_log_file_name(now));
    let json = json.unwrap_or_else(|| json_path_for(&log));
    (log, json)
}

/// `kdpilot-YYYYMMDD-HHMMSS.log` for `now`, in UTC.
pub fn default_log_file_name(now: SystemTime) -> PathBuf {
    let stamp: String = format_text_time(now)
        .chars()
        .take(19)
        .filter(char::is_ascii_digit)
        .collect();
    let (date, clock) = stamp.split_at(stamp.len().min(8));
    PathBuf::from(format!("kdpilot-{date}-{clock}.log"))
}

/// The JSON log's default path for a text log: the extension replaced by `.jsonl`
/// (`night.log` → `night.jsonl`), or `.jsonl` added when that would be the log itself.
pub fn json_path_for(log: &Path) -> PathBuf {
    let json = log.with_extension("jsonl");
    if json == log {
        let mut name = log.as_os_str().to_os_string();
        name.push(".jsonl");
        PathBuf::from(name)
    } else {
        json
    }
}

/// `fffff801`0f400000` (x64) or `8a3c2020` (x86: the low 32 bits of a sign-extended value).
fn word(arch: Arch, v: u64) -> String {
    match arch {
        Arch::X64 => format!("{:08x}`{:08x}", v >> 32, v & 0xFFFF_FFFF),
        Arch::X86 => format!("{:08x}", v & 0xFFFF_FFFF),
    }
}

/// Control characters (a newline from a target's string, an escape sequence) as `\xNN`, so one
/// field stays on its line and nothing reaches a terminal that `cat`s the log.
fn clean(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.push_str(&format!("\\x{:02x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out.into()
}

fn call_site(arch: Arch, f: &FrameRecord) -> String {
    if f.module.is_none() && f.function.is_none() {
        match arch {
            Arch::X64 => format!("{:#x}", f.address),
            Arch::X86 => format!("{:#x}", f.address & 0xFFFF_FFFF),
        }
    } else {
        clean(&f.call_site()).into_owned()
    }
}

/// The text log's block for a hit: a header line, the `kb` column header, a line per frame,
/// a blank line.
///
/// ```text
/// [2026-11-22 01:02:03.456 UTC] boot 2 hit 17  tag 'Leak' (0x6b61654c)  size 0x40  pool type 0x200  thread ffffc0e7`80001780  cpu 1  at nt!ExAllocateHeapSpecialPool
///  # Child-SP          RetAddr               : Args to Child                                                           : Call Site
/// 00 fffff880`0100ee48 fffff801`0f5a11e2     : 00000000`6b61654c 00000000`00000040 00000000`00000200 00000000`00000000 : nt!ExAllocateHeapSpecialPool
/// ```
///
/// x86 frames are ` # ChildEBP RetAddr  Args to Child` (three dword arguments), with the frame
/// pointer as ChildEBP (`????????` when the record has none).
pub fn format_hit_text(hit: &HitRecord) -> String {
    let arch = hit.arch;
    let mut out = String::with_capacity(256 + 160 * hit.frames.len());
    out.push_str(&format!(
        "[{}] boot {} hit {}  tag '{}' ({:#010x})  size {:#x}  pool type {:#x}  thread {}  cpu {}  at {}\n",
        format_text_time(hit.time),
        hit.boot,
        hit.hit,
        clean(&hit.tag),
        hit.tag_value,
        hit.size,
        hit.pool_type,
        word(arch, hit.thread),
        hit.processor,
        clean(&hit.breakpoint),
    ));
    if let Some(first) = hit.same_stack_as {
        out.push_str(&format!(
            "   (same stack as hit {first}: --stack-cap reached, counted only)\n\n"
        ));
        return out;
    }
    push_frames(&mut out, arch, &hit.frames);
    out.push('\n');
    out
}

/// The `kb`-style frame table (header and one line per frame, `(no frames)` when empty).
fn push_frames(out: &mut String, arch: Arch, frames: &[FrameRecord]) {
    match arch {
        Arch::X64 => out.push_str(" # Child-SP          RetAddr               : Args to Child                                                           : Call Site\n"),
        Arch::X86 => out.push_str(" # ChildEBP RetAddr  Args to Child\n"),
    }
    for (i, f) in frames.iter().enumerate() {
        let site = call_site(arch, f);
        match arch {
            Arch::X64 => {
                let mut args: Vec<String> = f.args.iter().take(4).map(|a| word(arch, *a)).collect();
                args.resize(4, "????????`????????".into());
                out.push_str(&format!(
                    "{i:02x} {} {}     : {} : {site}\n",
                    word(arch, f.child_sp),
                    word(arch, f.return_address),
                    args.join(" ")
                ));
            }
            Arch::X86 => {
                let mut args: Vec<String> = f.args.iter().take(3).map(|a| word(arch, *a)).collect();
                args.resize(3, "????????".into());
                let ebp = f
                    .frame_pointer
                    .map_or_else(|| "????????".to_string(), |v| word(arch, v));
                out.push_str(&format!(
                    "{i:02x} {ebp} {} {} {site}\n",
                    word(arch, f.return_address),
                    args.join(" ")
                ));
            }
        }
    }
    if frames.is_empty() {
        out.push_str("   (no frames)\n");
    }
}

/// The text log's line(s) for an event: `[time] ...`, with `=== ... ===` markers for boots,
/// arming and reboots.
pub fn format_event_text(event: &EventRecord) -> String {
    let t = format_text_time(event.time());
    let during = |boot: &Option<u64>| boot.map(|b| format!(" (boot {b})")).unwrap_or_default();
    match event {
        EventRecord::Connected {
            target, version, ..
        } => {
            let version = if version.is_empty() {
                String::new()
            } else {
                format!(" (kdpilot {})", clean(version))
            };
            format!("[{t}] connected to {}{version}\n", clean(target))
        }
        EventRecord::Boot {
            boot,
            build,
            arch,
            kernel_base,
            kaslr,
            ..
        } => format!(
            "[{t}] === boot {boot}: Windows build {build} {arch}, kernel at {}{} ===\n",
            word(*arch, *kernel_base),
            if *kaslr { " (KASLR)" } else { "" }
        ),
        EventRecord::Armed {
            boot,
            breakpoint,
            address,
            strategy,
            reason,
            ..
        } => {
            // The event does not carry the architecture: a 32-bit value (or a sign-extended
            // one, as KD reports x86 addresses) prints as x86's 8 digits.
            let arch = match *address >> 32 {
                0 => Arch::X86,
                0xFFFF_FFFF if *address & 0x8000_0000 != 0 => Arch::X86,
                _ => Arch::X64,
            };
            let why = if reason.is_empty() {
                String::new()
            } else {
                format!(": {}", clean(reason))
            };
            format!(
                "[{t}] === boot {boot}: armed {} at {} ({}{why}) ===\n",
                clean(breakpoint),
                word(arch, *address),
                clean(strategy)
            )
        }
        EventRecord::Reboot { boot, reason, .. } => {
            let why = if reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", clean(reason))
            };
            format!("[{t}] === reboot: boot {boot} ended{why} ===\n")
        }
        EventRecord::LinkLost { boot, reason, .. } => {
            format!("[{t}] link lost{}: {}\n", during(boot), clean(reason))
        }
        EventRecord::Detached {
            reason,
            hits,
            clean: was_clean,
            left_planted,
            ..
        } => {
            let mut s = format!(
                "[{t}] detached after {hits} hit{}: {}{}\n",
                if *hits == 1 { "" } else { "s" },
                clean(reason),
                if *was_clean {
                    ""
                } else {
                    " (NOT clean: the target may need attention)"
                }
            );
            if !left_planted.is_empty() {
                let names: Vec<String> =
                    left_planted.iter().map(|n| clean(n).into_owned()).collect();
                s.push_str(&format!(
                    "[{t}] WARNING: may still be planted on the target: {}\n",
                    names.join(", ")
                ));
            }
            s
        }
        EventRecord::Warning { boot, message, .. } => {
            format!("[{t}] warning{}: {}\n", during(boot), clean(message))
        }
        EventRecord::Allocated {
            boot, hit, address, ..
        } => {
            let arch = if *address >> 32 == 0 || *address >> 32 == 0xFFFF_FFFF && *address & 0x8000_0000 != 0 {
                Arch::X86
            } else {
                Arch::X64
            };
            format!("[{t}] boot {boot} hit {hit} returned {}\n", word(arch, *address))
        }
        EventRecord::Free {
            boot,
            hit,
            address,
            processor,
            thread,
            arch,
            breakpoint,
            frames,
            same_stack_as,
            ..
        } => {
            let mut out = format!(
                "[{t}] boot {boot} free of hit {hit}  block {}  thread {}  cpu {processor}  at {}\n",
                word(*arch, *address),
                word(*arch, *thread),
                clean(breakpoint)
            );
            if let Some(first) = same_stack_as {
                out.push_str(&format!(
                    "   (same stack as the free of hit {first}: --stack-cap reached, counted only)\n"
                ));
            } else {
                push_frames(&mut out, *arch, frames);
            }
            out.push('\n');
            out
        }
        EventRecord::SpecialPoolExhausted {
            boot,
            quiet_secs,
            switched,
            ..
        } => format!(
            "[{t}] WARNING (boot {boot}): special pool looks exhausted: no allocation of the tag from special pool for {quiet_secs} s, \
             while the kernel still allocates it{}\n",
            if *switched {
                "; switched to nt!PoolHitTag for the rest of this boot"
            } else {
                "; allocations now go to normal pool and are not caught (use --on-exhaustion pool-hit-tag to follow them, or reboot the target)"
            }
        ),
        EventRecord::Sampled {
            boot,
            one_in,
            reason,
            skipped,
            ..
        } => {
            let mut parts: Vec<String> = Vec::new();
            if !reason.is_empty() {
                parts.push(clean(reason).into_owned());
            }
            if *skipped > 0 {
                parts.push(format!(
                    "{skipped} hit{} resumed unrecorded before this",
                    if *skipped == 1 { "" } else { "s" }
                ));
            }
            let reason = &parts.join("; ");
            let why = if reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", clean(reason))
            };
            if *one_in <= 1 {
                format!(
                    "[{t}] sampling ended{}: every hit recorded{why}\n",
                    during(boot)
                )
            } else {
                format!(
                    "[{t}] sampling{}: 1 hit in {one_in} recorded{why}\n",
                    during(boot)
                )
            }
        }
    }
}
