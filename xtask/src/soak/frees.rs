//! `--track-frees`: the `allocated` and `free` records against the simulator's ground truth.
//!
//! Hits are mapped to the truth's allocations by the hit check ([`super::check::compare`]);
//! from there:
//!
//! - **addresses**: every `allocated` record gives its hit the address the truth's allocation
//!   returned, in the hit's boot; none names a hit the log does not have. A hit's address written
//!   twice with the same value is counted and shown, not failed (the report pairs by the value,
//!   so a copy changes nothing); twice with different values is wrong. A hit without an address
//!   is possible (its return stop can be lost with the link, or give way to 16 newer ones): they
//!   are counted, and more than [`MISSING_LIMIT`] of the hits fails.
//! - **frees**: every `free` record names a hit whose learnt address is the block freed, the
//!   truth freed that block in the same boot, and the record has the truth free's stop (frames,
//!   processor, thread); no hit freed twice.
//! - **completeness**: every free the truth stopped at the free breakpoint, of a block kdpilot
//!   had learnt, has its record. The simulator's kernel does not run while no debugger is
//!   connected (it lives in the same process and runs only while served), so a stop is never
//!   "missed while the link was down"; what a lost link can do is cut a stop in half. A missing
//!   free is excused when the log has a `link_lost` between the hit's `allocated` record and the
//!   next hit (the free is the workload's next operation after its allocation, so it falls in
//!   that window), and shown; any other missing free fails.
//! - **outstanding**: the learnt blocks not freed at the end of each boot, by the driver path
//!   that allocated them, as kdpilot's records say and as the truth says. Only the leaking paths
//!   may stay outstanding, apart from at most one balanced allocation per boot whose free had not
//!   come yet (a reboot or the end of the capture right after it).

use std::collections::{BTreeMap, HashMap};

use kdpilot_capture::record::{EventRecord, HitRecord, LogLine};
use kdpilot_sim::workload::{OpKind, TruthRecord};

use super::check::{call_sites, TruthHit, Verdict};

/// The share of hits that may end without a learnt address (returns lost with the link).
pub const MISSING_LIMIT: f64 = 0.02;

/// The driver functions whose allocations are never freed.
pub const LEAKING: [&str; 2] = ["leakydrv!LeakyAllocPushes", "leakydrv!LeakyAllocViaPool2"];

/// Outstanding blocks of one path: as kdpilot's records say, as the truth says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outstanding {
    /// Hits with no `free` record (what `kdpilot report --outstanding` lists).
    pub kdpilot: usize,
    /// ... of which the truth freed for a reason that is no defect: no address learnt, the free
    /// lost with the link, the free after the capture ended.
    pub explained: usize,
    /// Hits whose block the truth did not free in their boot.
    pub truth: usize,
}

/// The verdict on leak accounting.
#[derive(Debug, Default)]
pub struct FreeVerdict {
    /// Hits matched to the truth (the ones whose address can be checked).
    pub hits: usize,
    /// `allocated` records.
    pub allocated: usize,
    /// Hits with an address, the right one.
    pub learnt: usize,
    /// Matched hits with no `allocated` record.
    pub missing: usize,
    /// ... of which the simulator did stop at the return (the stop was seen by some
    /// connection, and no record came of it).
    pub missing_returned: usize,
    /// `allocated` records with an address other than the truth's, a boot other than the hit's,
    /// or of a hit the log does not have (or the hit check could not match).
    pub wrong_address: usize,
    /// A hit's address written again, the same.
    pub repeated_same: usize,
    /// A hit's address written again, different.
    pub repeated_different: usize,
    /// `free` records.
    pub frees: usize,
    /// `free` records that name no learnt hit, another address, a block the truth did not free
    /// in that boot, or another stop (frames, processor, thread).
    pub free_wrong: usize,
    /// A hit freed twice.
    pub free_duplicates: usize,
    /// Truth frees of learnt blocks that stopped at the free breakpoint (expected records).
    pub expected: usize,
    /// ... recorded.
    pub recorded: usize,
    /// ... missing with a `link_lost` around them (excused).
    pub missing_link_lost: usize,
    /// ... missing with the link up (a defect).
    pub missing_link_up: usize,
    /// Truth frees of learnt blocks that did not stop at the free breakpoint after the capture
    /// ended (the breakpoint is gone: the last allocations' frees).
    pub after_end: usize,
    /// ... and while kdpilot was attached (its free breakpoint was not planted: a defect).
    pub not_stopped: usize,
    /// The target refused a breakpoint (`warning` records), in order: (kdpilot's boot, time,
    /// message, frees of that boot not recorded with the link up or not stopped).
    pub refusals: Vec<(u64, String, String, usize)>,
    /// Stops at the free function that kdpilot took for someone else's (`warning` records).
    pub foreign_free_stops: usize,
    /// Truth frees that stopped at the free breakpoint, of blocks kdpilot did not learn (resumed
    /// without a record).
    pub unknown_stops: usize,
    /// Outstanding at the end of the boots, by path.
    pub by_path: BTreeMap<String, Outstanding>,
    /// Boots where the paths that free had more than one block outstanding at the end (kdpilot's
    /// view, leaving out excused missing frees, or the truth's), with the count.
    pub balanced_over: Vec<(u64, usize)>,
    /// Boots seen (kdpilot's numbers).
    pub boots: usize,
    /// Examples, for the report.
    pub examples: Vec<String>,
}

impl FreeVerdict {
    /// Hits without a learnt address, as a share of the hits.
    pub fn missing_share(&self) -> f64 {
        if self.hits == 0 {
            0.0
        } else {
            self.missing as f64 / self.hits as f64
        }
    }

    /// The failures, as sentences (empty: clean).
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.wrong_address > 0 || self.repeated_different > 0 {
            out.push(format!(
                "{} allocated record(s) with a wrong address or hit, {} hit(s) given two different addresses",
                self.wrong_address, self.repeated_different
            ));
        }
        if self.missing_share() > MISSING_LIMIT {
            out.push(format!(
                "{} of {} hits ({:.1}%) without a learnt address (limit {:.0}%)",
                self.missing,
                self.hits,
                100.0 * self.missing_share(),
                100.0 * MISSING_LIMIT
            ));
        }
        if self.free_wrong > 0 || self.free_duplicates > 0 {
            out.push(format!(
                "{} wrong free record(s), {} hit(s) freed twice",
                self.free_wrong, self.free_duplicates
            ));
        }
        if self.not_stopped > 0 {
            out.push(format!(
                "{} free(s) of learnt blocks made while kdpilot was attached did not stop at the free breakpoint \
                 (it was not planted)",
                self.not_stopped
            ));
        }
        if self.missing_link_up > 0 {
            out.push(format!(
                "{} free(s) of learnt blocks stopped at the free breakpoint with the link up and not recorded",
                self.missing_link_up
            ));
        }
        for (boot, when, message, lost) in &self.refusals {
            if *lost > 0 {
                out.push(format!(
                    "capture engine defect: in boot {boot} at {when} kdpilot warned \"{message}\" and {lost} free(s) of \
                     that boot were lost; the target refuses a breakpoint that is already planted (a WriteBreakPoint \
                     asked again after its reply was lost), kdpilot then forgets a breakpoint that is in place \
                     ({} stop(s) at the free function taken for someone else's)",
                    self.foreign_free_stops
                ));
            }
        }
        if !self.balanced_over.is_empty() {
            out.push(format!(
                "more than one balanced block outstanding at the end of boot(s) {:?} (boot, count)",
                self.balanced_over
            ));
        }
        let differ: Vec<String> = self
            .by_path
            .iter()
            .filter(|(_, o)| o.kdpilot - o.explained != o.truth)
            .map(|(p, o)| {
                format!(
                    "{p} {} ({} explained) / {}",
                    o.kdpilot, o.explained, o.truth
                )
            })
            .collect();
        if !differ.is_empty() {
            out.push(format!(
                "outstanding by path, kdpilot / truth, differ: {}",
                differ.join(", ")
            ));
        }
        out
    }
}

/// A log time as `HH:MM:SS.mmm` (UTC).
fn humantime_ms(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let s = d.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03} UTC",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_millis()
    )
}

/// The driver function an allocation's path ends in (`leakydrv!LeakyAllocPushes`).
fn driver_path(t: &TruthRecord) -> String {
    t.path
        .iter()
        .rev()
        .find(|p| p.starts_with("leakydrv!"))
        .cloned()
        .unwrap_or_else(|| t.path.last().cloned().unwrap_or_default())
}

fn note(examples: &mut Vec<String>, s: String) {
    if examples.len() < 12 {
        examples.push(s);
    }
}

/// Checks the `allocated` and `free` records of `lines` against `truth`, with the hits matched
/// by the hit check (`verdict`, over `hits`). `free_function`: where the free breakpoint is
/// (`nt!ExFreeHeapSpecialPool`).
pub fn check(
    truth: &[TruthRecord],
    hits: &[TruthHit],
    verdict: &Verdict,
    lines: &[LogLine],
    free_function: &str,
) -> FreeVerdict {
    let mut v = FreeVerdict::default();
    // hit -> (its record, the truth allocation's index)
    let records: HashMap<u64, &HitRecord> = lines
        .iter()
        .filter_map(|l| match l {
            LogLine::Hit(h) => Some((h.hit, h)),
            LogLine::Event(_) => None,
        })
        .collect();
    let alloc_of =
        |hit: u64| -> Option<usize> { verdict.matched.get(&hit).map(|k| hits[*k].record) };
    v.hits = verdict.matched.len();
    v.boots = records
        .values()
        .map(|h| h.boot)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    // Truth frees by block (addresses are unique in a night: one per operation).
    let mut truth_free: HashMap<u64, usize> = HashMap::new();
    for (i, t) in truth.iter().enumerate() {
        if t.kind == OpKind::Free {
            truth_free.insert(t.address, i);
        }
    }
    let stopped_at_free = |t: &TruthRecord| -> Option<Vec<String>> {
        t.stops
            .iter()
            .find(|s| {
                s.first()
                    .is_some_and(|f| format!("{}!{}", f.module, f.function) == free_function)
            })
            .map(|s| s.iter().map(ToString::to_string).collect())
    };

    // (a) addresses.
    let mut learnt: HashMap<u64, u64> = HashMap::new(); // hit -> address
    let mut allocated_at: HashMap<u64, usize> = HashMap::new(); // hit -> line index
    for (pos, l) in lines.iter().enumerate() {
        let LogLine::Event(EventRecord::Allocated {
            boot, hit, address, ..
        }) = l
        else {
            continue;
        };
        v.allocated += 1;
        if let Some(prev) = learnt.get(hit) {
            if prev == address {
                v.repeated_same += 1;
                note(
                    &mut v.examples,
                    format!("allocated: hit {hit}'s address {address:#x} written again (same)"),
                );
            } else {
                v.repeated_different += 1;
                note(
                    &mut v.examples,
                    format!("allocated: hit {hit} given {address:#x} after {prev:#x}"),
                );
            }
            continue;
        }
        let ok = match (records.get(hit), alloc_of(*hit)) {
            (Some(h), Some(i)) => h.boot == *boot && truth[i].address == *address,
            _ => false,
        };
        if ok {
            learnt.insert(*hit, *address);
            allocated_at.insert(*hit, pos);
        } else {
            v.wrong_address += 1;
            let expected = alloc_of(*hit).map_or_else(
                || "no matched hit".to_string(),
                |i| format!("{:#x} in truth boot {}", truth[i].address, truth[i].boot),
            );
            note(
                &mut v.examples,
                format!(
                    "allocated: hit {hit} (boot {boot}) at {address:#x}, the truth: {expected}"
                ),
            );
        }
    }
    v.learnt = learnt.len();
    for (hit, &k) in &verdict.matched {
        if !learnt.contains_key(hit) {
            v.missing += 1;
            if !truth[hits[k].record].returns.is_empty() {
                v.missing_returned += 1;
            }
        }
    }

    // (b) free records.
    let mut freed: HashMap<u64, usize> = HashMap::new(); // hit -> line index
    for (pos, l) in lines.iter().enumerate() {
        let LogLine::Event(EventRecord::Free {
            boot,
            hit,
            address,
            processor,
            thread,
            frames,
            same_stack_as,
            ..
        }) = l
        else {
            continue;
        };
        v.frees += 1;
        if freed.contains_key(hit) {
            v.free_duplicates += 1;
            note(
                &mut v.examples,
                format!("free: hit {hit} ({address:#x}) freed again"),
            );
            continue;
        }
        freed.insert(*hit, pos);
        let why = (|| {
            let Some(&a) = learnt.get(hit) else {
                return Some("its hit has no learnt address".to_string());
            };
            if a != *address {
                return Some(format!("its hit's address is {a:#x}"));
            }
            if records.get(hit).is_none_or(|h| h.boot != *boot) {
                return Some("its hit is in another boot".into());
            }
            let alloc = &truth[alloc_of(*hit)?];
            let Some(&f) = truth_free.get(address) else {
                return Some("the truth never freed that block".into());
            };
            let f = &truth[f];
            if f.boot != alloc.boot {
                return Some(format!(
                    "the truth freed it in boot {}, allocated in {}",
                    f.boot, alloc.boot
                ));
            }
            let Some(stop) = stopped_at_free(f) else {
                return Some("the truth's free never stopped at the free breakpoint".into());
            };
            if f.cpu != *processor || f.thread != *thread {
                return Some(format!(
                    "processor/thread {processor}/{thread:#x}, the truth {}/{:#x}",
                    f.cpu, f.thread
                ));
            }
            if same_stack_as.is_none() && call_sites(frames) != stop {
                return Some(format!(
                    "frames {:?}, the truth {:?}",
                    call_sites(frames),
                    stop
                ));
            }
            None
        })();
        if let Some(why) = why {
            v.free_wrong += 1;
            note(
                &mut v.examples,
                format!("free: hit {hit} (boot {boot}, {address:#x}): {why}"),
            );
        }
    }

    // (c) completeness, and (d) outstanding: over every matched hit (what `kdpilot report
    // --outstanding` pairs: a hit without an address stays unpaired, so outstanding).
    // Balanced blocks outstanding at the end of each boot (kdpilot's boot numbers): as kdpilot's
    // records say (leaving out the gaps explained below), as the truth says.
    let mut balanced_in_boot: BTreeMap<u64, usize> = BTreeMap::new();
    let mut truth_balanced_in_boot: BTreeMap<u64, usize> = BTreeMap::new();
    let mut lost_in_boot: BTreeMap<u64, usize> = BTreeMap::new();
    for (hit, &k) in &verdict.matched {
        let alloc = &truth[hits[k].record];
        let boot = records.get(hit).map_or(0, |h| h.boot);
        let path = driver_path(alloc);
        let truth_freed = truth_free
            .get(&alloc.address)
            .map(|&f| &truth[f])
            .filter(|f| f.boot == alloc.boot);
        let recorded = freed.contains_key(hit);
        // Outstanding in kdpilot's records while the truth freed it, for a reason that is
        // not a defect: no address learnt, a free lost with the link, a free after the end.
        let mut explained = false;
        // The window the free falls in (it is the workload's next operation after its
        // allocation): from the allocated record to the next hit.
        let window = || {
            let from = allocated_at.get(hit).copied().unwrap_or(0);
            let to = lines[from..]
                .iter()
                .position(|l| matches!(l, LogLine::Hit(_)))
                .map_or(lines.len(), |p| from + p);
            &lines[from..to]
        };
        let has = |kind: &str| {
            window()
                .iter()
                .any(|l| matches!(l, LogLine::Event(e) if e.kind() == kind))
        };
        match (learnt.get(hit), truth_freed) {
            (Some(&address), Some(f)) if stopped_at_free(f).is_some() => {
                v.expected += 1;
                if recorded {
                    v.recorded += 1;
                } else {
                    let lost = has("link_lost");
                    if lost {
                        v.missing_link_lost += 1;
                        explained = true;
                    } else {
                        v.missing_link_up += 1;
                        *lost_in_boot.entry(boot).or_default() += 1;
                    }
                    note(
                        &mut v.examples,
                        format!(
                            "free missing: hit {hit} (boot {boot}, {path}, block {address:#x}) was freed by the \
                             truth (seq {}, cpu {}) and stopped at {free_function}; {}",
                            f.seq,
                            f.cpu,
                            if lost {
                                "a link_lost lies between its allocated record and the next hit"
                            } else {
                                "the link was up: no link_lost between its allocated record and the next hit"
                            }
                        ),
                    );
                }
            }
            (Some(&address), Some(f)) => {
                // The truth freed it without a stop at the free breakpoint: fine after the
                // capture ended (the breakpoint is gone); while kdpilot was attached, its free
                // breakpoint was not planted.
                if has("detached") {
                    v.after_end += 1;
                    explained = !recorded;
                } else {
                    v.not_stopped += 1;
                    *lost_in_boot.entry(boot).or_default() += 1;
                    if v.not_stopped <= 3 {
                        note(
                            &mut v.examples,
                            format!(
                                "free not stopped: hit {hit} (boot {boot}, {path}, block {address:#x}) was freed by the \
                                 truth (seq {}, cpu {}) while kdpilot was attached, and {free_function} did not stop it: \
                                 the free breakpoint was not planted",
                                f.seq, f.cpu
                            ),
                        );
                    }
                }
            }
            (None, Some(_)) => explained = true,
            (_, None) => {}
        }
        let o = v.by_path.entry(path.clone()).or_default();
        let balanced = !LEAKING.contains(&path.as_str());
        if !recorded {
            o.kdpilot += 1;
            if explained {
                o.explained += 1;
            } else if balanced {
                *balanced_in_boot.entry(boot).or_default() += 1;
            }
        }
        if truth_freed.is_none() {
            o.truth += 1;
            if balanced {
                *truth_balanced_in_boot.entry(boot).or_default() += 1;
            }
        }
    }
    // What kdpilot said about breakpoints the target refused, and stops it did not own at the
    // free function: where a missing free usually comes from.
    let mut boot = 0;
    let free_name = free_function.rsplit('!').next().unwrap_or(free_function);
    for l in lines {
        match l {
            LogLine::Event(EventRecord::Boot { boot: b, .. }) => boot = *b,
            LogLine::Event(EventRecord::Warning { time, message, .. }) => {
                if message.contains("refused a breakpoint") {
                    let when = humantime_ms(*time);
                    let lost = lost_in_boot.get(&boot).copied().unwrap_or(0);
                    v.refusals.push((boot, when, message.clone(), lost));
                } else if message.contains("not kdpilot's") && message.contains(free_name) {
                    v.foreign_free_stops += 1;
                }
            }
            _ => {}
        }
    }
    let blocks: std::collections::HashSet<u64> = learnt.values().copied().collect();
    v.unknown_stops = truth
        .iter()
        .filter(|t| {
            t.kind == OpKind::Free && stopped_at_free(t).is_some() && !blocks.contains(&t.address)
        })
        .count();
    v.balanced_over = balanced_in_boot
        .into_iter()
        .chain(truth_balanced_in_boot)
        .filter(|(_, n)| *n > 1)
        .collect();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use kdpilot_capture::record::{Arch, FrameRecord};
    use kdpilot_sim::workload::{ReturnStop, TruthFrame};
    use std::time::SystemTime;

    fn tf(s: &str) -> TruthFrame {
        let (m, rest) = s.split_once('!').unwrap();
        let (f, off) = rest.split_once("+0x").unwrap_or((rest, "0"));
        TruthFrame {
            module: m.into(),
            function: f.into(),
            offset: u64::from_str_radix(off, 16).unwrap(),
        }
    }

    fn fr(s: &str) -> FrameRecord {
        let t = tf(s);
        FrameRecord {
            address: 0xfffff800_00001000,
            module: Some(t.module),
            function: Some(t.function),
            offset: t.offset,
            child_sp: 0,
            return_address: 0,
            frame_pointer: None,
            args: Vec::new(),
            trust: "context".into(),
        }
    }

    const ALLOC: &str = "nt!ExAllocateHeapSpecialPool";
    const FREE: &str = "nt!ExFreeHeapSpecialPool";

    /// A boot of: a balanced allocation (freed), a leak, a balanced allocation freed.
    fn night() -> Vec<TruthRecord> {
        let op = |seq: u64, kind, f: &str, address| TruthRecord {
            seq,
            boot: 7,
            tag: 1,
            size: 0x40,
            pool_type: 0x200,
            cpu: 0,
            thread: 0x1000,
            stops: vec![vec![
                tf(if kind == OpKind::Alloc { ALLOC } else { FREE }),
                tf(&format!("leakydrv!{f}+0x10")),
            ]],
            path: vec!["leakydrv!DriverEntry".into(), format!("leakydrv!{f}")],
            special_pool: true,
            kind,
            address,
            returns: vec![ReturnStop {
                stack: Vec::new(),
                value: address,
            }],
        };
        vec![
            op(0, OpKind::Alloc, "LeakyFreeBalanced", 0xa000),
            op(1, OpKind::Free, "LeakyFreeBalanced", 0xa000),
            op(2, OpKind::Alloc, "LeakyAllocPushes", 0xb000),
            op(3, OpKind::Alloc, "LeakyFreeBalanced", 0xc000),
            op(4, OpKind::Free, "LeakyFreeBalanced", 0xc000),
        ]
    }

    fn log(truth: &[TruthRecord]) -> Vec<LogLine> {
        let mut out = Vec::new();
        let mut hit = 0;
        for t in truth {
            let frames: Vec<FrameRecord> = t.stops[0].iter().map(|f| fr(&f.to_string())).collect();
            if t.kind == OpKind::Alloc {
                hit += 1;
                out.push(LogLine::Hit(HitRecord {
                    hit,
                    boot: 1,
                    time: SystemTime::UNIX_EPOCH,
                    tag: "x".into(),
                    tag_value: t.tag,
                    size: t.size,
                    pool_type: t.pool_type,
                    processor: t.cpu,
                    thread: t.thread,
                    arch: Arch::X64,
                    breakpoint: ALLOC.into(),
                    strategy: "auto".into(),
                    frames,
                    same_stack_as: None,
                }));
                out.push(LogLine::Event(EventRecord::Allocated {
                    time: SystemTime::UNIX_EPOCH,
                    boot: 1,
                    hit,
                    address: t.address,
                }));
            } else {
                out.push(LogLine::Event(EventRecord::Free {
                    time: SystemTime::UNIX_EPOCH,
                    boot: 1,
                    hit,
                    address: t.address,
                    processor: t.cpu,
                    thread: t.thread,
                    arch: Arch::X64,
                    breakpoint: FREE.into(),
                    frames,
                    same_stack_as: None,
                }));
            }
        }
        out
    }

    fn run(truth: &[TruthRecord], lines: &[LogLine]) -> FreeVerdict {
        let (hits, _) = super::super::check::truth_hits(truth, ALLOC);
        let records: Vec<&HitRecord> = lines
            .iter()
            .filter_map(|l| match l {
                LogLine::Hit(h) => Some(h),
                LogLine::Event(_) => None,
            })
            .collect();
        let verdict = super::super::check::compare(&hits, &records);
        assert!(verdict.clean(), "{verdict:?}");
        check(truth, &hits, &verdict, lines, FREE)
    }

    #[test]
    fn a_clean_night_is_clean() {
        let t = night();
        let v = run(&t, &log(&t));
        assert!(v.failures().is_empty(), "{v:?}");
        assert_eq!((v.hits, v.learnt, v.missing), (3, 3, 0));
        assert_eq!((v.frees, v.expected, v.recorded), (2, 2, 2));
        assert_eq!(
            v.by_path["leakydrv!LeakyAllocPushes"],
            Outstanding {
                kdpilot: 1,
                explained: 0,
                truth: 1
            }
        );
        assert_eq!(
            v.by_path["leakydrv!LeakyFreeBalanced"],
            Outstanding::default()
        );
    }

    #[test]
    fn the_checks_find_what_they_must() {
        let t = night();
        // A wrong address, a missing free with the link up, a free recorded twice.
        let mut lines = log(&t);
        if let LogLine::Event(EventRecord::Allocated { address, .. }) = &mut lines[4] {
            *address += 0x10;
        }
        let free_c = lines.pop().unwrap();
        let v = run(&t, &lines);
        assert_eq!(v.wrong_address, 1, "{v:?}");
        assert_eq!(v.missing_link_up, 1, "{v:?}");
        assert!(!v.failures().is_empty());

        let mut lines = log(&t);
        lines.push(free_c.clone());
        let v = run(&t, &lines);
        assert_eq!(v.free_duplicates, 1, "{v:?}");

        // The same free lost with the link: excused, and said.
        let mut lines = log(&t);
        lines.pop();
        lines.push(LogLine::Event(EventRecord::LinkLost {
            time: SystemTime::UNIX_EPOCH,
            boot: Some(1),
            reason: "gone".into(),
        }));
        let v = run(&t, &lines);
        assert_eq!((v.missing_link_lost, v.missing_link_up), (1, 0), "{v:?}");
        assert!(v.failures().is_empty(), "{:?}", v.failures());

        // A free with another stack is wrong.
        let mut lines = log(&t);
        if let Some(LogLine::Event(EventRecord::Free { frames, .. })) = lines.last_mut() {
            frames[1].offset += 1;
        }
        let v = run(&t, &lines);
        assert_eq!(v.free_wrong, 1, "{v:?}");
    }
}
