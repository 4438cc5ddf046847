//! The soak's verdict: the JSON log against the simulator's ground truth (every allocation that
//! stopped at the breakpoint recorded once, with its frames, size, tag, processor and thread),
//! and the re-arm times from the log's events.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use kdpilot_capture::record::{EventRecord, FrameRecord, HitRecord, LogLine};
use kdpilot_sim::workload::TruthRecord;

/// One stop at the breakpoint, as the simulator made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TruthHit {
    pub boot: u64,
    pub cpu: u16,
    pub thread: u64,
    pub size: u64,
    pub tag: u32,
    pub pool_type: u64,
    pub frames: Vec<String>,
    /// The allocation's index in the truth.
    pub record: usize,
}

/// Every stop of the truth whose innermost frame is `function` (`nt!ExAllocateHeapSpecialPool`),
/// in order; also how many allocations stopped there more than once.
pub fn truth_hits(truth: &[TruthRecord], function: &str) -> (Vec<TruthHit>, u64) {
    let mut out = Vec::new();
    let mut repeated = 0;
    for (record, t) in truth.iter().enumerate() {
        let mut here = 0;
        for s in &t.stops {
            let Some(first) = s.first() else { continue };
            if format!("{}!{}", first.module, first.function) != function {
                continue;
            }
            here += 1;
            out.push(TruthHit {
                boot: t.boot,
                cpu: t.cpu,
                thread: t.thread,
                size: t.size,
                tag: t.tag,
                pool_type: t.pool_type,
                frames: s.iter().map(ToString::to_string).collect(),
                record,
            });
        }
        if here > 1 {
            repeated += 1;
        }
    }
    (out, repeated)
}

/// A record's frames as `module!function+0xoff`, up to the first frame outside every module.
fn frames(h: &HitRecord) -> Vec<String> {
    call_sites(&h.frames)
}

/// Frames as `module!function+0xoff`, up to the first frame outside every module (as the
/// truth writes a stack).
pub fn call_sites(frames: &[FrameRecord]) -> Vec<String> {
    frames
        .iter()
        .map(|f| f.call_site())
        .take_while(|s| !s.starts_with("0x"))
        .collect()
}

fn same(t: &TruthHit, h: &HitRecord) -> bool {
    t.thread == h.thread
        && t.cpu == h.processor
        && t.size == h.size
        && t.tag == h.tag_value
        && t.pool_type == h.pool_type
        && t.frames == frames(h)
}

/// The records against the truth.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Stops at the breakpoint (ground truth).
    pub made: usize,
    /// Hit records in the JSON log.
    pub written: usize,
    /// Stops with no record.
    pub lost: usize,
    /// Records that match no stop near their place (frames, size, tag, CPU, thread or boot
    /// differ).
    pub wrong: usize,
    /// Records of a stop already recorded.
    pub duplicates: usize,
    /// Hit numbers that are not 1, 2, 3... in log order.
    pub misnumbered: usize,
    /// Examples, for the report.
    pub examples: Vec<String>,
    /// Each hit matched to the truth: hit number -> index in the truth hits.
    pub matched: BTreeMap<u64, usize>,
    /// kdpilot's boot numbers -> the simulator's, as the first match of each shows them.
    pub boots: BTreeMap<u64, u64>,
}

impl Verdict {
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.wrong == 0 && self.duplicates == 0 && self.misnumbered == 0
    }
}

/// How far ahead of its expected place a record may match (records are in stop order; a gap
/// means the stops in between were lost).
const WINDOW: usize = 256;

/// Aligns the records with the truth, in order.
pub fn compare(truth: &[TruthHit], records: &[&HitRecord]) -> Verdict {
    let mut v = Verdict {
        made: truth.len(),
        written: records.len(),
        ..Verdict::default()
    };
    let mut covered = vec![false; truth.len()];
    // kdpilot's boot numbers against the simulator's, as the first match of each shows them.
    let mut boots: BTreeMap<u64, u64> = BTreeMap::new();
    let fits = |boots: &BTreeMap<u64, u64>, t: &TruthHit, h: &HitRecord| {
        same(t, h) && boots.get(&h.boot).is_none_or(|b| *b == t.boot)
    };
    let mut next = 0usize;
    for (n, h) in records.iter().enumerate() {
        if h.hit != n as u64 + 1 {
            v.misnumbered += 1;
        }
        let end = (next + WINDOW).min(truth.len());
        let found = (next..end).find(|&k| fits(&boots, &truth[k], h));
        match found {
            Some(k) => {
                boots.entry(h.boot).or_insert(truth[k].boot);
                v.matched.insert(h.hit, k);
                covered[k] = true;
                next = k + 1;
            }
            None if next > 0 && fits(&boots, &truth[next - 1], h) => {
                v.duplicates += 1;
                note(&mut v.examples, format!("duplicate: hit {}", h.hit));
            }
            None => {
                v.wrong += 1;
                let expected = truth.get(next).map_or_else(
                    || "nothing (more records than stops)".to_string(),
                    |t| format!("{:?}", t.frames.first()),
                );
                note(
                    &mut v.examples,
                    format!(
                        "wrong: hit {} (boot {}, {:?}, size {:#x}) where the truth has {expected}",
                        h.hit,
                        h.boot,
                        frames(h).first(),
                        h.size
                    ),
                );
                if let Some(c) = covered.get_mut(next) {
                    *c = true; // recorded, wrongly: counted once, as wrong
                }
                next += 1;
            }
        }
    }
    v.boots = boots;
    v.lost = covered.iter().filter(|c| !**c).count();
    if v.lost > 0 {
        let first = covered.iter().position(|c| !c).unwrap_or(0);
        note(
            &mut v.examples,
            format!(
                "lost: stop {} of {} (boot {}, {:?})",
                first + 1,
                truth.len(),
                truth[first].boot,
                truth[first].frames.first()
            ),
        );
    }
    v
}

fn note(examples: &mut Vec<String>, s: String) {
    if examples.len() < 8 {
        examples.push(s);
    }
}

/// Every line of the JSON log, parsed by the reader kdpilot report uses.
pub fn read_log(json: &Path) -> Result<Vec<LogLine>> {
    let text =
        std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            LogLine::parse(l).with_context(|| format!("{}:{}: not a record", json.display(), i + 1))
        })
        .collect()
}

/// Re-arm times: from each reboot event to the next `armed` (the reboot's stop, the downtime,
/// the new boot, symbols, arming), and from each new boot's `boot` event to its `armed`
/// (kdpilot's own share). Reboots not followed by an `armed` are counted apart.
#[derive(Debug, Default)]
pub struct Rearm {
    pub reboots: usize,
    pub rearmed: usize,
    pub from_reboot: Vec<Duration>,
    pub from_boot: Vec<Duration>,
}

pub fn rearm_times(lines: &[LogLine]) -> Rearm {
    let events: Vec<&EventRecord> = lines
        .iter()
        .filter_map(|l| match l {
            LogLine::Event(e) => Some(e),
            LogLine::Hit(_) => None,
        })
        .collect();
    let mut r = Rearm::default();
    let since = |a: SystemTime, b: SystemTime| b.duration_since(a).unwrap_or_default();
    for (i, e) in events.iter().enumerate() {
        match e {
            EventRecord::Reboot { time, .. } => {
                r.reboots += 1;
                let rest = &events[i + 1..];
                let armed = rest
                    .iter()
                    .take_while(|e| !matches!(e, EventRecord::Reboot { .. }))
                    .find(|e| matches!(e, EventRecord::Armed { .. }));
                if let Some(a) = armed {
                    r.rearmed += 1;
                    r.from_reboot.push(since(*time, a.time()));
                }
            }
            EventRecord::Boot { time, boot, .. } if *boot > 1 => {
                let armed = events[i + 1..]
                    .iter()
                    .take_while(|e| !matches!(e, EventRecord::Reboot { .. }))
                    .find(|e| matches!(e, EventRecord::Armed { .. }));
                if let Some(a) = armed {
                    r.from_boot.push(since(*time, a.time()));
                }
            }
            _ => {}
        }
    }
    r
}

/// Each link outage: from a `link_lost` event to the next `connected`.
pub fn outages(lines: &[LogLine]) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut lost: Option<SystemTime> = None;
    for l in lines {
        match l {
            LogLine::Event(EventRecord::LinkLost { time, .. }) => {
                lost.get_or_insert(*time);
            }
            LogLine::Event(EventRecord::Connected { time, .. }) => {
                if let Some(t) = lost.take() {
                    out.push(time.duration_since(t).unwrap_or_default());
                }
            }
            _ => {}
        }
    }
    out
}

/// The longest stretch with nothing in the log (no hit, no event) outside `except` (the hang,
/// when silence is expected): a capture that stalls shows here.
pub fn longest_quiet(lines: &[LogLine], except: (SystemTime, SystemTime)) -> Duration {
    let mut longest = Duration::ZERO;
    for pair in lines.windows(2) {
        let (a, b) = (pair[0].time(), pair[1].time());
        if a < except.1 && b > except.0 {
            continue; // overlaps the expected silence
        }
        longest = longest.max(b.duration_since(a).unwrap_or_default());
    }
    longest
}

/// min / median / max, as text.
pub fn spread(d: &[Duration]) -> String {
    if d.is_empty() {
        return "-".into();
    }
    let mut v = d.to_vec();
    v.sort();
    format!(
        "min {:.2} s, median {:.2} s, max {:.2} s",
        v[0].as_secs_f64(),
        v[v.len() / 2].as_secs_f64(),
        v[v.len() - 1].as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kdpilot_capture::record::Arch;

    fn truth(n: u64) -> TruthHit {
        TruthHit {
            boot: 1 + n / 4,
            cpu: (n % 2) as u16,
            thread: 0x1000 + n % 2,
            size: 0x40 + n,
            tag: 7,
            pool_type: 0x200,
            frames: vec![
                "nt!ExAllocateHeapSpecialPool".into(),
                format!("leakydrv!F{n}+0x1"),
            ],
            record: n as usize,
        }
    }

    fn record(hit: u64, boot: u64, t: &TruthHit) -> HitRecord {
        let frame = |s: &str| {
            let (m, rest) = s.split_once('!').unwrap();
            let (f, off) = rest.split_once("+0x").unwrap_or((rest, "0"));
            FrameRecord {
                address: 0xfffff800_00001000,
                module: Some(m.into()),
                function: Some(f.into()),
                offset: u64::from_str_radix(off, 16).unwrap(),
                child_sp: 0,
                return_address: 0,
                frame_pointer: None,
                args: Vec::new(),
                trust: "context".into(),
            }
        };
        HitRecord {
            hit,
            boot,
            time: SystemTime::UNIX_EPOCH,
            tag: "x".into(),
            tag_value: t.tag,
            size: t.size,
            pool_type: t.pool_type,
            processor: t.cpu,
            thread: t.thread,
            arch: Arch::X64,
            breakpoint: "nt!ExAllocateHeapSpecialPool".into(),
            strategy: "auto".into(),
            frames: t.frames.iter().map(|s| frame(s)).collect(),
            same_stack_as: None,
        }
    }

    #[test]
    fn the_comparison_finds_what_it_must() {
        let t: Vec<TruthHit> = (0..12).map(truth).collect();
        let all: Vec<HitRecord> = t
            .iter()
            .enumerate()
            .map(|(i, x)| record(i as u64 + 1, x.boot, x))
            .collect();
        let refs: Vec<&HitRecord> = all.iter().collect();
        assert!(compare(&t, &refs).clean());

        // One lost (stop 5), one duplicated (stop 8), one wrong (stop 10's size).
        let mut bad: Vec<HitRecord> = Vec::new();
        for (i, x) in t.iter().enumerate() {
            if i == 4 {
                continue;
            }
            let mut r = record(0, x.boot, x);
            if i == 9 {
                r.size += 1;
            }
            bad.push(r.clone());
            if i == 7 {
                bad.push(r);
            }
        }
        for (i, r) in bad.iter_mut().enumerate() {
            r.hit = i as u64 + 1;
        }
        let refs: Vec<&HitRecord> = bad.iter().collect();
        let v = compare(&t, &refs);
        assert_eq!((v.lost, v.duplicates, v.wrong), (1, 1, 1), "{v:?}");

        // A record put in the wrong boot is wrong.
        let mut moved = all.clone();
        moved[5].boot = 1;
        let refs: Vec<&HitRecord> = moved.iter().collect();
        let v = compare(&t, &refs);
        assert_eq!(v.wrong, 1, "{v:?}");
    }
}
