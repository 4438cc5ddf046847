//! The records a capture writes: one [`HitRecord`] per allocation caught, one [`EventRecord`]
//! for everything else (connection, boots, arming, reboots, link loss, the end), and
//! [`LogLine`], which reads either back from a JSON-lines log.
//!
//! The JSON form is the schema of docs/capture-log.md: field names and order are the
//! declaration order here; addresses are `"0x..."` hex strings (JSON numbers lose precision above
//! 2^53 in most readers), counts and sizes are numbers, times are RFC 3339 UTC with milliseconds
//! (`2026-11-22T01:02:03.456Z`). Reading accepts numbers where hex strings are written, any RFC
//! 3339 offset and any number of fractional digits, and ignores unknown fields, so newer logs
//! stay readable.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::OffsetDateTime;

/// The target's architecture, as the logs name it (`"x64"`, `"x86"`). It decides how the text
/// log prints values (x64: `fffff801`0f400000`, 4 args per frame; x86: `8a3c2020`, 3 args).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Arch {
    /// x64 (AMD64).
    #[default]
    #[serde(rename = "x64")]
    X64,
    /// 32-bit x86.
    #[serde(rename = "x86")]
    X86,
}

impl Arch {
    /// `"x64"` or `"x86"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X64 => "x64",
            Arch::X86 => "x86",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<kdpilot_kd::Arch> for Arch {
    fn from(arch: kdpilot_kd::Arch) -> Self {
        match arch {
            kdpilot_kd::Arch::Amd64 => Arch::X64,
            kdpilot_kd::Arch::X86 => Arch::X86,
        }
    }
}

/// One allocation of the tag, caught at the breakpoint: a line of the JSON log (no `event` key)
/// and a block of the text log.
///
/// Addresses (`thread`, frame addresses) are the values KD reports: on x86 they are
/// sign-extended to 64 bits (`0xffffffff8a3c2020`); the text log prints their low 32 bits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HitRecord {
    /// The hit number in this capture, from 1, counted across boots.
    pub hit: u64,
    /// The boot number in this capture, from 1; each reboot of the target adds one.
    pub boot: u64,
    /// When the hit was taken (host clock). Written as RFC 3339 UTC with milliseconds, so it
    /// reads back truncated to the millisecond.
    #[serde(with = "rfc3339_ms")]
    pub time: SystemTime,
    /// The pool tag's 4 characters, in memory order, printable ASCII as is and other bytes
    /// (and `\`) escaped as `\xNN`: [`tag_text`] of `tag_value`.
    pub tag: String,
    /// The tag as the 32-bit value the allocator got (`'Leak'` is `0x6b61654c`).
    #[serde(default)]
    pub tag_value: u32,
    /// The requested size in bytes.
    pub size: u64,
    /// The POOL_TYPE (or POOL_FLAGS) argument as passed.
    pub pool_type: u64,
    /// The processor that hit the breakpoint.
    pub processor: u16,
    /// The current thread (its KTHREAD address). JSON: a hex string.
    #[serde(with = "hex")]
    pub thread: u64,
    /// The target's architecture.
    #[serde(default)]
    pub arch: Arch,
    /// The breakpoint that was hit, by name (`nt!ExAllocateHeapSpecialPool`).
    pub breakpoint: String,
    /// The strategy that planted it (`special-pool`, `pool-hit-tag`, `breakpoint`).
    #[serde(default)]
    pub strategy: String,
    /// The stack, innermost frame first. Empty when `same_stack_as` is set.
    pub frames: Vec<FrameRecord>,
    /// The per-stack cap (`--stack-cap`) was reached: this hit's stack is the same as hit
    /// `same_stack_as`'s (its frames are not repeated); left out otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub same_stack_as: Option<u64>,
}

/// One frame of a hit's stack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameRecord {
    /// The frame's instruction pointer: the breakpoint address for frame 0, a return address
    /// for the others. JSON: a hex string.
    #[serde(with = "hex")]
    pub address: u64,
    /// The module's WinDbg name (`nt`, `hal`, `leakydrv`), `null` outside every known module.
    pub module: Option<String>,
    /// The function's name without the module (`MmAllocateSpecialPool`), `null` when unknown.
    pub function: Option<String>,
    /// The offset of `address` from the function's start when `function` is known, else from
    /// the module's base when `module` is known, else 0.
    pub offset: u64,
    /// The stack pointer in this frame (WinDbg's Child-SP). JSON: a hex string.
    #[serde(with = "hex", default)]
    pub child_sp: u64,
    /// Where this frame returns to (the next frame's address; 0 at the bottom or when
    /// unknown). JSON: a hex string.
    #[serde(with = "hex", default)]
    pub return_address: u64,
    /// The frame pointer (RBP/EBP) in this frame, which the x86 text log shows as `ChildEBP`.
    /// JSON: a hex string, left out when unknown.
    #[serde(with = "hex_opt", default, skip_serializing_if = "Option::is_none")]
    pub frame_pointer: Option<u64>,
    /// `kb`'s "Args to Child": the words above the return address (4 on x64, 3 on x86), empty
    /// when unreadable. JSON: hex strings.
    #[serde(with = "hex_vec", default)]
    pub args: Vec<u64>,
    /// How the frame was found: the unwinder's `FrameTrust` as it displays (`context`,
    /// `unwind info`, `frame data`, `code analysis`, `frame pointer`, `stack scan`).
    #[serde(default)]
    pub trust: String,
}

impl FrameRecord {
    /// The frame the way `kb` names it: `module!function+0xoff` (`module!function` at offset
    /// 0), `module+0xoff` without a function, else the address (`0xfffff8010f512340`).
    pub fn call_site(&self) -> String {
        match (&self.module, &self.function) {
            (Some(m), Some(f)) if self.offset == 0 => format!("{m}!{f}"),
            (Some(m), Some(f)) => format!("{m}!{f}+{:#x}", self.offset),
            (Some(m), None) => format!("{m}+{:#x}", self.offset),
            (None, Some(f)) if self.offset == 0 => f.clone(),
            (None, Some(f)) => format!("{f}+{:#x}", self.offset),
            (None, None) => format!("{:#x}", self.address),
        }
    }
}

/// A line of the JSON log that is not a hit: `{"event": "<kind>", "time": ..., ...}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventRecord {
    /// The link to the target is up (the first time, and again after a link loss).
    Connected {
        /// When.
        #[serde(with = "rfc3339_ms")]
        time: SystemTime,
        /// The endpoint, as given to `--target`.
        target: String,
        /// kdpilot's version.
        #[serde(default)]
        version: String,
    },
    /// A boot of the target was identified (the first one seen, and each after a reboot).
    Boot {
        /// When.
        #[serde(with = "rfc3339_ms")]
        time: SystemTime,
        /// The boot number, from 1.
        boot: u64,
        /// The Windows build number (19041).
        build: u32,
        /// The architecture.
        arch: Arch,
        /// The kernel's base address. JSON: a hex string.
        #[serde(with = "hex")]
        kernel_base: u64,
        /// The kernel is not at its image's preferred base or the previous boot's
        /// (address space layout randomisation moved it).
        #[serde(default)]
        kaslr: bool,
    },
    /// The breakpoint is planted (after connecting, and again in each new boot).
    Armed {
        /// When.
        #[serde(with = "rfc3339_ms")]
        time: SystemTime,
        /// The boot number.
        boot: u64,
        /// What is planted, by name (`nt!ExAllocateHeapSpecialPool`, `nt!PoolHitTag`).
        breakpoint: String,
        /// Its address in this boot. JSON: a hex string.
        #[serde(with = "hex")]
        address: u64,
        /// The strategy (`special-pool`, `pool-hit-tag`, `breakpoint`).
        strategy: String,
        /// Why this strategy and symbol were chosen.
        #[serde(default)]
        reason: String,
    },
    /// A boot ended (the kernel's "unload all" stop, or a reboot noticed after the fact).
    Reboot {
        /// When.
        #[serde(with = "rfc3339_ms")]
        time: SystemTime,
        /// The boot that ended.
        boot: u64,
        /// How it was noticed.
        #[serde(default)]
        reason: String,
    },
    /// The link to the target went away (a vanished pipe or socket, a target that stopped
    /// answering). kdpilot keeps waiting for it.
    LinkLost {
        /// When.
        #[serde(with = "rfc3339_ms")]
        time: SystemTime,
        /// The boot in progress, if one was identified.
        #[serde(default)]
        boot: Option<u64>,
        /// What happened.
        reason: String,
    },
    /// The capture ended.
    Detached {
        /// When.
        #[serde(with = "rfc3339_ms")]
        time: SystemTime,
        /// Why (`max-hits`, `duration`, `interrupted`, `terminated`, a write error).
        reason: String,
        /// Hits recorded in the whole capture.
        hits: u64,
        /// Every breakpoint was removed, PoolHitTag restored and the target resumed.
        clean: bool,
        /// What may still be planted on the target when `clean` is false (the link was gone):
        /// breakpoint names, `nt!PoolHitTag`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        left_planted: Vec<String>,
    },
    /// Something the user should know that did not stop the capture.
    Warning {
        /// When.
        #[serde(with = "rfc3339_ms")]
        time: SystemTime,
        /// The boot in progress, if any.
        #[serde(default)]
        boot: Option<u64>,
        /// The message.
        message: String,
    },
    /// Sampling changed: from now on 1 hit in `one_in` is recorded (1: every hit again).
    Sampled {
        /// When.
        #[serde(with = "rfc3339_ms")]
        time: SystemTime,
        /// The boot in progress, if any.
        #[serde(default)]
        boot: Option<u64>,
        /// 1 hit recorded in this many (1 ends sampling).
        one_in: u64,
        /// Why (the frozen-time budget per minute was exceeded, ...).
        #[serde(default)]
        reason: String,
        /// Hits resumed without a record since the previous `sampled` event.
        #[serde(default)]
        skipped: u64,
    },
    /// `--track-frees`: the address the allocator returned for hit `hit` (read from rax/eax
    /// at the return into the allocator's caller).
    Allocated {
        /// When.
        #[serde(with = "rfc3339_ms")]
        time: SystemTime,
        /// The boot.
        boot: u64,
        /// The hit (allocation) this address belongs to.
        hit: u64,
        /// The block's address. JSON: a hex string. 0: the allocation failed (NULL).
        #[serde(with = "hex")]
        address: u64,
    },
    /// `--track-frees`: a captured allocation was freed.
    Free {
        /// When.
        #[serde(with = "rfc3339_ms")]
        time: SystemTime,
        /// The boot.
        boot: u64,
        /// The hit (allocation) freed.
        hit: u64,
        /// The block's address. JSON: a hex string.
        #[serde(with = "hex")]
        address: u64,
        /// The processor that freed it.
        processor: u16,
        /// The freeing thread (KTHREAD). JSON: a hex string.
        #[serde(with = "hex")]
        thread: u64,
        /// The target's architecture.
        #[serde(default)]
        arch: Arch,
        /// Where the free was caught (`nt!MmFreeSpecialPool`, `nt!PoolHitTag`).
        breakpoint: String,
        /// The freeing stack, innermost frame first (empty when `same_stack_as` is set).
        frames: Vec<FrameRecord>,
        /// As for hits: the per-stack cap was reached and this free's stack is the same as
        /// the one in the `free` record of hit `same_stack_as`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        same_stack_as: Option<u64>,
    },
    /// Special pool looks exhausted: its breakpoint went quiet while the kernel still
    /// allocates the tag (caught by a PoolHitTag probe).
    SpecialPoolExhausted {
        /// When.
        #[serde(with = "rfc3339_ms")]
        time: SystemTime,
        /// The boot.
        boot: u64,
        /// How long special pool had served no allocation of the tag, in seconds.
        quiet_secs: u64,
        /// The capture switched to PoolHitTag for the rest of the boot (`--on-exhaustion
        /// pool-hit-tag`); false: it only warns and keeps the special-pool breakpoint.
        switched: bool,
    },
}

impl EventRecord {
    /// The event's time.
    pub fn time(&self) -> SystemTime {
        match self {
            EventRecord::Connected { time, .. }
            | EventRecord::Boot { time, .. }
            | EventRecord::Armed { time, .. }
            | EventRecord::Reboot { time, .. }
            | EventRecord::LinkLost { time, .. }
            | EventRecord::Detached { time, .. }
            | EventRecord::Warning { time, .. }
            | EventRecord::Sampled { time, .. }
            | EventRecord::Allocated { time, .. }
            | EventRecord::Free { time, .. }
            | EventRecord::SpecialPoolExhausted { time, .. } => *time,
        }
    }

    /// The value of the `event` key (`connected`, `link_lost`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            EventRecord::Connected { .. } => "connected",
            EventRecord::Boot { .. } => "boot",
            EventRecord::Armed { .. } => "armed",
            EventRecord::Reboot { .. } => "reboot",
            EventRecord::LinkLost { .. } => "link_lost",
            EventRecord::Detached { .. } => "detached",
            EventRecord::Warning { .. } => "warning",
            EventRecord::Sampled { .. } => "sampled",
            EventRecord::Allocated { .. } => "allocated",
            EventRecord::Free { .. } => "free",
            EventRecord::SpecialPoolExhausted { .. } => "special_pool_exhausted",
        }
    }
}

/// A line of the JSON log read back: a hit (no `event` key) or an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum LogLine {
    /// A hit.
    Hit(HitRecord),
    /// An event.
    Event(EventRecord),
}

impl LogLine {
    /// Parses one line of the JSON log (without or with its `\n`). A line with an `event` key
    /// is an event, any other object a hit; the error names the field at fault.
    pub fn parse(line: &str) -> Result<LogLine, serde_json::Error> {
        #[derive(Deserialize)]
        struct Probe {
            #[serde(default)]
            event: Option<serde::de::IgnoredAny>,
        }
        let probe: Probe = serde_json::from_str(line)?;
        if probe.event.is_some() {
            serde_json::from_str(line).map(LogLine::Event)
        } else {
            serde_json::from_str(line).map(LogLine::Hit)
        }
    }

    /// The line's time.
    pub fn time(&self) -> SystemTime {
        match self {
            LogLine::Hit(h) => h.time,
            LogLine::Event(e) => e.time(),
        }
    }
}

impl<'de> Deserialize<'de> for LogLine {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(d)?;
        if value.get("event").is_some() {
            EventRecord::deserialize(value)
                .map(LogLine::Event)
                .map_err(D::Error::custom)
        } else {
            HitRecord::deserialize(value)
                .map(LogLine::Hit)
                .map_err(D::Error::custom)
        }
    }
}

impl From<HitRecord> for LogLine {
    fn from(hit: HitRecord) -> Self {
        LogLine::Hit(hit)
    }
}

impl From<EventRecord> for LogLine {
    fn from(event: EventRecord) -> Self {
        LogLine::Event(event)
    }
}

/// A pool tag's 4 bytes (in memory order: `0x6b61654c` is `Leak`) as text: printable ASCII as
/// is, other bytes and `\` as `\xNN`.
pub fn tag_text(tag_value: u32) -> String {
    let mut out = String::with_capacity(4);
    for b in tag_value.to_le_bytes() {
        if (0x20..0x7f).contains(&b) && b != b'\\' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// The inverse of [`tag_text`]: exactly 4 bytes after `\xNN` escapes are decoded, else
/// `None`.
pub fn parse_tag(tag: &str) -> Option<u32> {
    let mut bytes = Vec::with_capacity(4);
    let mut rest = tag.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'\\' {
            let hex = tail.get(1..3)?;
            if tail.first() != Some(&b'x') {
                return None;
            }
            let hex = std::str::from_utf8(hex).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = tail.get(3..)?;
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    let bytes: [u8; 4] = bytes.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

fn to_offset_date_time(t: SystemTime) -> OffsetDateTime {
    let nanos: i128 = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
        Err(e) => i128::try_from(e.duration().as_nanos()).map_or(i128::MIN, |n| -n),
    };
    OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(if nanos < 0 {
        // Outside years -9999..=9999: clamp (no clock says so).
        OffsetDateTime::new_utc(time::Date::MIN, time::Time::MIDNIGHT)
    } else {
        OffsetDateTime::new_utc(time::Date::MAX, time::Time::MAX)
    })
}

fn from_offset_date_time(t: OffsetDateTime) -> Option<SystemTime> {
    let nanos = t.unix_timestamp_nanos();
    let secs = nanos.div_euclid(1_000_000_000);
    let sub = u32::try_from(nanos.rem_euclid(1_000_000_000)).ok()?;
    if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(u64::try_from(secs).ok()?, sub))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(u64::try_from(-secs).ok()?))?
            .checked_add(Duration::new(0, sub))
    }
}

/// `2026-11-22T01:02:03.456Z`: RFC 3339 in UTC, milliseconds truncated (the JSON log's form).
pub fn format_rfc3339(t: SystemTime) -> String {
    to_offset_date_time(t)
        .format(format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        ))
        .unwrap_or_default()
}

/// `2026-11-22 01:02:03.456 UTC` (the text log's form).
pub fn format_text_time(t: SystemTime) -> String {
    to_offset_date_time(t)
        .format(format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3] UTC"
        ))
        .unwrap_or_default()
}

/// Parses RFC 3339 with any offset and any number of fractional digits.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .and_then(from_offset_date_time)
}

/// Serde for `SystemTime` as RFC 3339 UTC with milliseconds.
mod rfc3339_ms {
    use super::*;

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_rfc3339(*t))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        use serde::de::Error;
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        parse_rfc3339(&s).ok_or_else(|| D::Error::custom(format!("{s:?} is not an RFC 3339 time")))
    }
}

/// A u64 written as `"0x..."`, read from such a string or a plain number.
#[derive(Clone, Copy)]
struct Hex(u64);

impl Serialize for Hex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:#x}", self.0))
    }
}

impl<'de> Deserialize<'de> for Hex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Hex;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a \"0x...\" hex string or an unsigned integer")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Hex, E> {
                Ok(Hex(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Hex, E> {
                let digits = v
                    .strip_prefix("0x")
                    .or_else(|| v.strip_prefix("0X"))
                    .ok_or_else(|| E::custom(format!("{v:?} does not start with 0x")))?;
                u64::from_str_radix(digits, 16)
                    .map(Hex)
                    .map_err(|e| E::custom(format!("{v:?}: {e}")))
            }
        }
        d.deserialize_any(V)
    }
}

mod hex {
    use super::Hex;
    use serde::{Deserialize, Serialize};

    pub fn serialize<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        Hex(*v).serialize(s)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        Hex::deserialize(d).map(|h| h.0)
    }
}

mod hex_opt {
    use super::Hex;
    use serde::{Deserialize, Serialize};

    pub fn serialize<S: serde::Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        v.map(Hex).serialize(s)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Option::<Hex>::deserialize(d).map(|h| h.map(|h| h.0))
    }
}

mod hex_vec {
    use super::Hex;
    use serde::ser::SerializeSeq;
    use serde::Deserialize;

    pub fn serialize<S: serde::Serializer>(v: &[u64], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for x in v {
            seq.serialize_element(&Hex(*x))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
        Vec::<Hex>::deserialize(d).map(|v| v.into_iter().map(|h| h.0).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        assert_eq!(tag_text(0x6b61654c), "Leak");
        assert_eq!(tag_text(u32::from_le_bytes(*b"Fil ")), "Fil ");
        assert_eq!(tag_text(0x0061_5c41), "A\\x5ca\\x00");
        assert_eq!(tag_text(0xff41_4243), "CBA\\xff");
        for v in [0x6b61654c, 0x0061_5c41, 0xff41_4243, 0, u32::MAX] {
            assert_eq!(parse_tag(&tag_text(v)), Some(v));
        }
        assert_eq!(parse_tag("Lea"), None);
        assert_eq!(parse_tag("Leak!"), None);
        assert_eq!(parse_tag("Lea\\x6"), None);
        assert_eq!(parse_tag("Lea\\y6b"), None);
    }

    #[test]
    fn times() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_309_323_456) + Duration::from_micros(789);
        assert_eq!(format_rfc3339(t), "2026-11-22T01:02:03.456Z");
        assert_eq!(format_text_time(t), "2026-11-22 01:02:03.456 UTC");
        assert_eq!(
            parse_rfc3339("2026-11-22T01:02:03.456Z"),
            Some(UNIX_EPOCH + Duration::from_millis(1_795_309_323_456))
        );
        assert_eq!(
            parse_rfc3339("2026-11-22T02:02:03.456789+01:00"),
            Some(UNIX_EPOCH + Duration::from_micros(1_795_309_323_456_789))
        );
        let before = UNIX_EPOCH - Duration::from_millis(1500);
        assert_eq!(format_rfc3339(before), "1969-12-31T23:59:58.500Z");
        assert_eq!(parse_rfc3339("1969-12-31T23:59:58.500Z"), Some(before));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn hex_fields_accept_numbers() {
        let f: FrameRecord = serde_json::from_str(
            r#"{"address": 4096, "module": null, "function": null, "offset": 0, "args": ["0x1", 2]}"#,
        )
        .unwrap();
        assert_eq!(f.address, 0x1000);
        assert_eq!(f.args, vec![1, 2]);
        assert_eq!(f.frame_pointer, None);
        assert!(serde_json::from_str::<FrameRecord>(
            r#"{"address": "1000", "module": null, "function": null, "offset": 0}"#
        )
        .is_err());
    }

    #[test]
    fn call_sites() {
        let mut f = FrameRecord {
            address: 0xfffff801_0f512340,
            module: Some("nt".into()),
            function: Some("MmAllocateSpecialPool".into()),
            offset: 0,
            child_sp: 0,
            return_address: 0,
            frame_pointer: None,
            args: vec![],
            trust: String::new(),
        };
        assert_eq!(f.call_site(), "nt!MmAllocateSpecialPool");
        f.offset = 0x1c;
        assert_eq!(f.call_site(), "nt!MmAllocateSpecialPool+0x1c");
        f.function = None;
        assert_eq!(f.call_site(), "nt+0x1c");
        f.module = None;
        assert_eq!(f.call_site(), "0xfffff8010f512340");
    }

    #[test]
    fn event_kinds_match_the_tag() {
        let e = EventRecord::LinkLost {
            time: UNIX_EPOCH,
            boot: None,
            reason: "gone".into(),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], e.kind());
    }
}
