//! Reading and classifying a log's lines on several threads, handed back in file order.
//!
//! Parsing JSON is the cost of a report (a hit line is 1 to 3 KB); counting is cheap. So one
//! thread reads lines into batches, worker threads classify them ([`classify`]), and the
//! caller's thread gets them back in file order (captures, boots and warnings depend on the
//! order). At most [`IN_FLIGHT`] batches exist at a time, so memory stays bounded whatever the
//! threads' speeds.

use std::collections::BTreeMap;
use std::io::{self, BufRead};
use std::ops::Range;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Mutex;
use std::time::SystemTime;

use kdpilot_capture::record::{EventRecord, HitRecord};

use crate::lines::{classify, Line, LineReader, MAX_LINE};

/// A batch is handed on at this many bytes of lines...
const BATCH_BYTES: usize = 1 << 20;
/// ...or this many lines.
const BATCH_LINES: usize = 2048;
/// Batches read but not yet handed to the caller, at most.
pub const IN_FLIGHT: usize = 8;

/// A line, classified.
#[derive(Debug)]
pub struct Parsed {
    /// Its number in the file, from 1.
    pub number: u64,
    /// It ended with `\n`.
    pub terminated: bool,
    /// What it is.
    pub line: Record,
}

/// A line as the aggregation needs it: like [`Line`], with a hit reduced to [`CompactHit`] on
/// the parsing thread (which frees the record's many strings where it allocated them).
#[derive(Debug)]
pub enum Record {
    /// A hit.
    Hit(CompactHit),
    /// An event.
    Event(EventRecord),
    /// A record of a kind this version does not know.
    Unknown(String),
    /// Only white space.
    Blank,
    /// Not a record: why.
    Bad(String),
}

/// What the report keeps of a hit: its numbers and one string that is both the pool tag and
/// the stack's key ([`CompactHit::tag`], [`CompactHit::stack_key`]).
#[derive(Debug, PartialEq, Eq)]
pub struct CompactHit {
    /// The hit number in its capture.
    pub hit: u64,
    /// The boot number in its capture.
    pub boot: u64,
    /// When.
    pub time: SystemTime,
    /// Bytes requested.
    pub size: u64,
    /// The per-stack cap was reached: the stack is hit `same_stack_as`'s (the frames are
    /// empty).
    pub same_stack_as: Option<u64>,
    /// The tag, `\0`, then per frame `module \x1f function \x1f offset-hex \x1e`
    /// (`\x01` for a missing module or function; the address for the offset of a frame with
    /// neither).
    key: String,
}

/// A missing module or function in a stack key.
pub(crate) const NONE: &str = "\x01";

impl CompactHit {
    /// Reduces a hit record.
    pub fn new(hit: &HitRecord) -> Self {
        use std::fmt::Write as _;
        let mut key = String::with_capacity(hit.tag.len() + 1 + hit.frames.len() * 48);
        key.push_str(&hit.tag);
        key.push('\0');
        for f in &hit.frames {
            let offset = if f.module.is_none() && f.function.is_none() {
                f.address
            } else {
                f.offset
            };
            let _ = write!(
                key,
                "{}\x1f{}\x1f{offset:x}\x1e",
                f.module.as_deref().unwrap_or(NONE),
                f.function.as_deref().unwrap_or(NONE)
            );
        }
        CompactHit {
            hit: hit.hit,
            boot: hit.boot,
            time: hit.time,
            size: hit.size,
            same_stack_as: hit.same_stack_as.filter(|_| hit.frames.is_empty()),
            key,
        }
    }

    /// The pool tag.
    pub fn tag(&self) -> &str {
        self.key.split_once('\0').map_or("", |(tag, _)| tag)
    }

    /// The stack's key: equal for two hits exactly when their stacks are the same stack.
    pub fn stack_key(&self) -> &str {
        self.key.split_once('\0').map_or("", |(_, k)| k)
    }
}

/// The frames of a stack key: module, function, offset (or address).
pub fn key_frames(key: &str) -> impl Iterator<Item = (Option<&str>, Option<&str>, u64)> {
    key.split_terminator('\x1e').map(|frame| {
        let mut parts = frame.splitn(3, '\x1f');
        let module = parts.next().filter(|&n| n != NONE);
        let function = parts.next().filter(|&n| n != NONE);
        let offset = parts
            .next()
            .and_then(|o| u64::from_str_radix(o, 16).ok())
            .unwrap_or(0);
        (module, function, offset)
    })
}

/// A read failed at `line`.
pub type ReadFailure = (u64, io::Error);

struct RawBatch {
    index: u64,
    data: Vec<u8>,
    /// Number, bytes in `data` (`None`: too long, skipped), terminated.
    lines: Vec<(u64, Option<Range<usize>>, bool)>,
}

impl RawBatch {
    fn new(index: u64) -> Self {
        RawBatch {
            index,
            data: Vec::with_capacity(BATCH_BYTES + 16 * 1024),
            lines: Vec::with_capacity(BATCH_LINES),
        }
    }

    fn parse(self) -> (u64, Vec<Parsed>) {
        let lines = self
            .lines
            .into_iter()
            .map(|(number, range, terminated)| Parsed {
                number,
                terminated,
                line: parse(range.and_then(|r| self.data.get(r))),
            })
            .collect();
        (self.index, lines)
    }
}

fn parse(bytes: Option<&[u8]>) -> Record {
    let line = match bytes {
        Some(bytes) => classify(bytes),
        None => return Record::Bad(format!("longer than {} MiB: not a record", MAX_LINE >> 20)),
    };
    match line {
        Line::Hit(hit) => Record::Hit(CompactHit::new(&hit)),
        Line::Event(e) => Record::Event(e),
        Line::Unknown(k) => Record::Unknown(k),
        Line::Blank => Record::Blank,
        Line::Bad(m) => Record::Bad(m),
    }
}

/// The threads to parse with: `KDPILOT_REPORT_THREADS` if set (1: no threads, for
/// measurements), else the machine's cores, at most 4.
pub fn default_threads() -> usize {
    if let Some(n) = std::env::var("KDPILOT_REPORT_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        return n.max(1);
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// Reads every line of `reader`, classifies it, and calls `apply` with each in file order.
/// With `threads` ≤ 1 everything happens on the caller's thread.
pub fn for_each_line<R, F>(reader: R, threads: usize, mut apply: F) -> Result<(), ReadFailure>
where
    R: BufRead + Send,
    F: FnMut(Parsed),
{
    let mut lines = LineReader::new(reader);
    if threads <= 1 {
        loop {
            match lines.next_line() {
                Ok(Some(raw)) => apply(Parsed {
                    number: raw.number,
                    terminated: raw.terminated,
                    line: parse(raw.bytes),
                }),
                Ok(None) => return Ok(()),
                Err(e) => return Err((lines.line_number() + 1, e)),
            }
        }
    }

    let (raw_tx, raw_rx) = sync_channel::<RawBatch>(IN_FLIGHT);
    let (parsed_tx, parsed_rx) = sync_channel::<(u64, Vec<Parsed>)>(IN_FLIGHT);
    // One token per batch in flight: the reader takes one before it reads a batch, the caller's
    // thread gives it back once the batch is applied.
    let (token_tx, token_rx) = sync_channel::<()>(IN_FLIGHT);
    for _ in 0..IN_FLIGHT {
        let _ = token_tx.send(());
    }
    let raw_rx = Mutex::new(raw_rx);

    std::thread::scope(|scope| {
        let reader = scope.spawn(move || -> Result<(), ReadFailure> {
            let mut index = 0;
            loop {
                if token_rx.recv().is_err() {
                    return Ok(()); // the caller stopped
                }
                let mut batch = RawBatch::new(index);
                index += 1;
                let mut end = false;
                while batch.data.len() < BATCH_BYTES && batch.lines.len() < BATCH_LINES {
                    match lines.next_line() {
                        Ok(Some(raw)) => {
                            let range = raw.bytes.map(|b| {
                                let start = batch.data.len();
                                batch.data.extend_from_slice(b);
                                start..batch.data.len()
                            });
                            batch.lines.push((raw.number, range, raw.terminated));
                        }
                        Ok(None) => {
                            end = true;
                            break;
                        }
                        Err(e) => return Err((lines.line_number() + 1, e)),
                    }
                }
                if !batch.lines.is_empty() && raw_tx.send(batch).is_err() {
                    return Ok(());
                }
                if end {
                    return Ok(());
                }
            }
        });
        for _ in 0..threads {
            let parsed_tx = parsed_tx.clone();
            let raw_rx = &raw_rx;
            scope.spawn(move || loop {
                let next = match raw_rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                let Ok(batch) = next else { return };
                if parsed_tx.send(batch.parse()).is_err() {
                    return;
                }
            });
        }
        drop(parsed_tx);
        apply_in_order(&parsed_rx, &token_tx, &mut apply);
        drop(token_tx);
        drop(parsed_rx);
        reader
            .join()
            .unwrap_or_else(|_| Err((0, io::Error::other("the thread reading the log failed"))))
    })
}

/// Hands the parsed batches to `apply` in batch order, giving a token back for each.
fn apply_in_order<F: FnMut(Parsed)>(
    parsed: &Receiver<(u64, Vec<Parsed>)>,
    tokens: &std::sync::mpsc::SyncSender<()>,
    apply: &mut F,
) {
    let mut waiting: BTreeMap<u64, Vec<Parsed>> = BTreeMap::new();
    let mut next = 0;
    for (index, lines) in parsed {
        waiting.insert(index, lines);
        while let Some(lines) = waiting.remove(&next) {
            lines.into_iter().for_each(&mut *apply);
            next += 1;
            let _ = tokens.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_give_the_same_lines_in_the_same_order() {
        let mut input = Vec::new();
        for i in 0..20_000 {
            if i % 997 == 0 {
                input.extend_from_slice(b"garbage\n");
            } else {
                input.extend_from_slice(
                    format!(
                        "{{\"event\":\"warning\",\"time\":\"2026-11-22T01:00:00Z\",\"boot\":null,\"message\":\"{i}\"}}\n"
                    )
                    .as_bytes(),
                );
            }
        }
        input.extend_from_slice(b"{\"event\":\"warn");
        let collect = |threads| {
            let mut out = Vec::new();
            for_each_line(&input[..], threads, |p| {
                out.push(format!("{} {} {:?}", p.number, p.terminated, p.line))
            })
            .unwrap();
            out
        };
        let one = collect(1);
        assert_eq!(one.len(), 20_001);
        assert_eq!(collect(2), one);
        assert_eq!(collect(4), one);
    }
}
