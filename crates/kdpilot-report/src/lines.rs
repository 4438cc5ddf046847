//! Reading a JSON-lines capture log a line at a time, in bounded memory, and telling what each
//! line is: a hit, an event, a record of a kind this version does not know, or not a record.
//!
//! Parsing goes through the capture's own types ([`HitRecord`], [`EventRecord`]), so the
//! report reads exactly the schema the capture writes (docs/capture-log.md).

use std::io::{self, BufRead};

use kdpilot_capture::record::{EventRecord, HitRecord};

/// The longest line read. A 256-frame x64 hit is about 64 KiB; anything near this is not a
/// record (a file of zeros after a power loss, a binary file), and it is skipped without
/// being held in memory whole.
pub const MAX_LINE: usize = 8 << 20;

/// One line of a log, read.
#[derive(Debug)]
pub enum Line {
    /// A hit.
    Hit(Box<HitRecord>),
    /// An event.
    Event(EventRecord),
    /// A record of a kind this version does not know (a newer capture's `free` record, a new
    /// event): skipped and counted by kind.
    Unknown(String),
    /// Only white space.
    Blank,
    /// Not a record: why.
    Bad(String),
}

/// Reads lines of at most [`MAX_LINE`] bytes, counting them.
pub struct LineReader<R> {
    reader: R,
    buf: Vec<u8>,
    line: u64,
}

/// A raw line.
pub struct RawLine<'a> {
    /// Its number, from 1.
    pub number: u64,
    /// Its bytes without the `\n`, or `None` when it was longer than [`MAX_LINE`] (skipped).
    pub bytes: Option<&'a [u8]>,
    /// It ended with `\n` (false only for the last line of a file).
    pub terminated: bool,
}

impl<R: BufRead> LineReader<R> {
    /// Reads from `reader` (a `BufReader` over the file).
    pub fn new(reader: R) -> Self {
        LineReader {
            reader,
            buf: Vec::with_capacity(16 * 1024),
            line: 0,
        }
    }

    /// The number of the last line returned.
    pub fn line_number(&self) -> u64 {
        self.line
    }

    /// The next line, `None` at the end of the input.
    pub fn next_line(&mut self) -> io::Result<Option<RawLine<'_>>> {
        self.buf.clear();
        let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX) + 1;
        let n = io::Read::take(&mut self.reader, limit).read_until(b'\n', &mut self.buf)?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        let terminated = self.buf.last() == Some(&b'\n');
        if !terminated && self.buf.len() > MAX_LINE {
            // Too long: skip the rest of it without keeping it.
            self.reader.skip_until(b'\n')?;
            return Ok(Some(RawLine {
                number: self.line,
                bytes: None,
                terminated: true,
            }));
        }
        let bytes = match self.buf.split_last() {
            Some((b'\n', rest)) => rest,
            _ => self.buf.as_slice(),
        };
        Ok(Some(RawLine {
            number: self.line,
            bytes: Some(bytes),
            terminated,
        }))
    }
}

/// The `event` and `kind` keys of a line, read without the rest.
#[derive(serde::Deserialize)]
struct Probe {
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    kind: Option<String>,
}

/// The event kinds this version reads ([`EventRecord::kind`] of each variant). An event line
/// of another kind is a newer capture's and is skipped with a count; one of these kinds that
/// does not parse is a bad line.
pub const KNOWN_EVENTS: [&str; 11] = [
    "connected",
    "boot",
    "armed",
    "reboot",
    "link_lost",
    "detached",
    "warning",
    "sampled",
    "allocated",
    "free",
    "special_pool_exhausted",
];

/// What a line is.
///
/// A line with an `event` key is an event; one with a `kind` key other than `hit` is a record
/// of a newer capture (issue 9's `free` records) and is skipped; anything else must be a hit.
/// Most lines are hits: they are parsed once, straight into a [`HitRecord`], unless the text
/// `"event"` or `"kind"` occurs in them.
pub fn classify(bytes: &[u8]) -> Line {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Line::Bad("not UTF-8 text".into());
    };
    if text.trim().is_empty() {
        return Line::Blank;
    }
    if text.contains("\"event\"") || text.contains("\"kind\"") {
        let probe: Probe = match serde_json::from_str(text) {
            Ok(p) => p,
            Err(e) => return Line::Bad(describe(&e)),
        };
        if let Some(kind) = probe.event {
            return match serde_json::from_str::<EventRecord>(text) {
                Ok(event) => Line::Event(event),
                Err(_) if !KNOWN_EVENTS.contains(&kind.as_str()) => {
                    Line::Unknown(format!("event {}", printable(&kind)))
                }
                Err(e) => Line::Bad(format!("a `{kind}` event, but {}", describe(&e))),
            };
        }
        if let Some(kind) = probe.kind.filter(|k| k != "hit") {
            return Line::Unknown(printable(&kind));
        }
    }
    match serde_json::from_str::<HitRecord>(text) {
        Ok(hit) => Line::Hit(Box::new(hit)),
        Err(e) => Line::Bad(describe(&e)),
    }
}

/// serde_json's message without its "at line 1 column N" (the line is ours to number), with
/// the column kept where it helps.
fn describe(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let message = full
        .rsplit_once(" at line ")
        .map_or(full.as_str(), |(m, _)| m);
    match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            format!("not JSON: {message} (column {})", e.column())
        }
        _ => format!("not a record: {message}"),
    }
}

/// A kind name from the input, cut to 40 characters and without control characters, for
/// messages and counts.
fn printable(kind: &str) -> String {
    kind.chars()
        .take(40)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_numbered_and_long_ones_skipped() {
        let mut input = b"one\n\ntwo".to_vec();
        let mut reader = LineReader::new(&input[..]);
        let l = reader.next_line().unwrap().unwrap();
        assert_eq!(
            (l.number, l.bytes, l.terminated),
            (1, Some(&b"one"[..]), true)
        );
        let l = reader.next_line().unwrap().unwrap();
        assert_eq!((l.number, l.bytes), (2, Some(&b""[..])));
        let l = reader.next_line().unwrap().unwrap();
        assert_eq!(
            (l.number, l.bytes, l.terminated),
            (3, Some(&b"two"[..]), false)
        );
        assert!(reader.next_line().unwrap().is_none());

        input = vec![b'x'; MAX_LINE + 10];
        input.extend_from_slice(b"\nafter\n");
        let mut reader = LineReader::new(io::BufReader::new(&input[..]));
        let l = reader.next_line().unwrap().unwrap();
        assert_eq!((l.number, l.bytes), (1, None));
        let l = reader.next_line().unwrap().unwrap();
        assert_eq!((l.number, l.bytes), (2, Some(&b"after"[..])));
    }

    #[test]
    fn classification() {
        assert!(matches!(classify(b"  "), Line::Blank));
        assert!(matches!(classify(b"\xff\xfe"), Line::Bad(m) if m == "not UTF-8 text"));
        match classify(b"[2026-11-22 01:02:03.456 UTC] boot 2 hit 17") {
            Line::Bad(m) => assert!(m.starts_with("not JSON: "), "{m}"),
            other => panic!("{other:?}"),
        }
        match classify(br#"{"hit": 1}"#) {
            Line::Bad(m) => assert_eq!(m, "not a record: missing field `boot`"),
            other => panic!("{other:?}"),
        }
        match classify(br#"{"kind":"free","address":"0x1000","time":"2026-11-22T01:02:03.456Z"}"#) {
            Line::Unknown(k) => assert_eq!(k, "free"),
            other => panic!("{other:?}"),
        }
        match classify(br#"{"event":"frobbed","time":"2026-11-22T01:02:03.456Z"}"#) {
            Line::Unknown(k) => assert_eq!(k, "event frobbed"),
            other => panic!("{other:?}"),
        }
        match classify(br#"{"event":"boot","time":"2026-11-22T01:02:03.456Z"}"#) {
            Line::Bad(m) => assert_eq!(m, "a `boot` event, but not a record: missing field `boot`"),
            other => panic!("{other:?}"),
        }
        let e = classify(
            br#"{"event":"warning","time":"2026-11-22T01:02:03.456Z","boot":null,"message":"m"}"#,
        );
        assert!(
            matches!(e, Line::Event(EventRecord::Warning { .. })),
            "{e:?}"
        );
    }

    #[test]
    fn every_event_kind_is_known() {
        use std::time::UNIX_EPOCH;
        let events = [
            EventRecord::Connected {
                time: UNIX_EPOCH,
                target: String::new(),
                version: String::new(),
            },
            EventRecord::Boot {
                time: UNIX_EPOCH,
                boot: 1,
                build: 1,
                arch: Default::default(),
                kernel_base: 0,
                kaslr: false,
            },
            EventRecord::Armed {
                time: UNIX_EPOCH,
                boot: 1,
                breakpoint: String::new(),
                address: 0,
                strategy: String::new(),
                reason: String::new(),
            },
            EventRecord::Reboot {
                time: UNIX_EPOCH,
                boot: 1,
                reason: String::new(),
            },
            EventRecord::LinkLost {
                time: UNIX_EPOCH,
                boot: None,
                reason: String::new(),
            },
            EventRecord::Detached {
                time: UNIX_EPOCH,
                reason: String::new(),
                hits: 0,
                clean: true,
                left_planted: vec![],
            },
            EventRecord::Warning {
                time: UNIX_EPOCH,
                boot: None,
                message: String::new(),
            },
            EventRecord::Sampled {
                time: UNIX_EPOCH,
                boot: None,
                one_in: 1,
                reason: String::new(),
                skipped: 0,
            },
            EventRecord::Allocated {
                time: UNIX_EPOCH,
                boot: 1,
                hit: 1,
                address: 0x1000,
            },
            EventRecord::Free {
                time: UNIX_EPOCH,
                boot: 1,
                hit: 1,
                address: 0x1000,
                processor: 0,
                thread: 0,
                arch: kdpilot_capture::record::Arch::X64,
                breakpoint: String::new(),
                frames: Vec::new(),
                same_stack_as: None,
            },
            EventRecord::SpecialPoolExhausted {
                time: UNIX_EPOCH,
                boot: 1,
                quiet_secs: 1,
                switched: false,
            },
        ];
        for e in &events {
            assert!(KNOWN_EVENTS.contains(&e.kind()), "{}", e.kind());
            let line = serde_json::to_vec(e).unwrap();
            assert!(matches!(classify(&line), Line::Event(_)), "{}", e.kind());
        }
        assert_eq!(events.len(), KNOWN_EVENTS.len());
    }
}
