//! DBGKD_ANY_WAIT_STATE_CHANGE (kd-protocol.md 2.4): the STATE_CHANGE64 payload a target sends
//! when it stops. 240 bytes, then optional data (the LoadSymbols path, the CommandString
//! strings, exception trace data).
//!
//! [`StateChange::parse`] keeps every byte: the typed union view ([`StateInfo`]) is written
//! over [`StateChange::union_bytes`] on encode, so padding and the junk real kernels leave in
//! unused union bytes (T1 frame 952: 0xfffff801 in LoadSymbols padding) round-trip. The
//! control report stays raw ([`StateChange::control_report_bytes`]) because its layout depends
//! on the architecture: [`StateChange::control_report`] decodes it.

use crate::wire::bytes::{Fields, FieldsMut};
use crate::wire::status;
use crate::{Arch, PayloadError};

/// Size of DBGKD_ANY_WAIT_STATE_CHANGE.
pub const STATE_CHANGE_SIZE: usize = 240;
/// Size of the union `u` at offset 32.
pub const STATE_CHANGE_UNION_SIZE: usize = 160;
/// Size of the control report area at offset 192 (the AMD64 report; x86 uses 40 of it).
pub const CONTROL_REPORT_SIZE: usize = 48;
/// Offset of the union.
const UNION_OFFSET: usize = 32;
/// Offset of the control report.
const REPORT_OFFSET: usize = 192;

/// NewState values.
pub mod new_state {
    /// DbgKdExceptionStateChange.
    pub const EXCEPTION: u32 = 0x3030;
    /// DbgKdLoadSymbolsStateChange.
    pub const LOAD_SYMBOLS: u32 = 0x3031;
    /// DbgKdCommandStringStateChange.
    pub const COMMAND_STRING: u32 = 0x3032;
    /// DbgKdAlternateStateChange: may be OR-ed into the values above.
    pub const ALTERNATE: u32 = 0x0001_0000;
}

/// ControlReport.ReportFlags bits.
pub mod report_flags {
    /// REPORT_INCLUDES_SEGS: the segment registers are valid.
    pub const INCLUDES_SEGS: u16 = 0x1;
    /// REPORT_STANDARD_CS: CS is the standard kernel code segment.
    pub const STANDARD_CS: u16 = 0x2;
}

/// BaseOfDll of an "unload all" LoadSymbols: the system is rebooting (KD_REBOOT, -1).
pub const KD_REBOOT: u64 = u64::MAX;
/// BaseOfDll of an "unload all" LoadSymbols: the system is hibernating (KD_HIBERNATE, -2).
pub const KD_HIBERNATE: u64 = u64::MAX - 1;

/// EXCEPTION_RECORD64 (152 bytes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExceptionRecord64 {
    /// ExceptionCode @0 (0x80000003 breakpoint, 0x80000004 single step...).
    pub code: u32,
    /// ExceptionFlags @4.
    pub flags: u32,
    /// ExceptionRecord @8 (nested record address).
    pub record: u64,
    /// ExceptionAddress @16.
    pub address: u64,
    /// NumberParameters @24 (the target does not bound it; use [`Self::parameters`]).
    pub number_parameters: u32,
    /// ExceptionInformation[15] @32. Entries past NumberParameters are stack junk on real
    /// kernels (T1 frame 378).
    pub information: [u64; 15],
}

impl ExceptionRecord64 {
    /// The first `NumberParameters` entries of ExceptionInformation (at most 15).
    pub fn parameters(&self) -> &[u64] {
        let n = (self.number_parameters as usize).min(self.information.len());
        self.information.get(..n).unwrap_or(&[])
    }
}

/// DBGKM_EXCEPTION64 (160 bytes): the union of an exception state change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exception64 {
    /// The exception record.
    pub record: ExceptionRecord64,
    /// FirstChance @152 (nonzero: first chance).
    pub first_chance: u32,
}

impl Exception64 {
    /// An exception at `address`, first chance, no parameters.
    pub fn new(code: u32, address: u64) -> Self {
        Self {
            record: ExceptionRecord64 {
                code,
                address,
                ..Default::default()
            },
            first_chance: 1,
        }
    }

    /// Whether this is a first-chance exception.
    pub fn is_first_chance(&self) -> bool {
        self.first_chance != 0
    }

    fn parse(f: &Fields<'_>) -> Result<Self, PayloadError> {
        let mut information = [0u64; 15];
        for (i, slot) in information.iter_mut().enumerate() {
            *slot = f.u64(32 + 8 * i)?;
        }
        Ok(Self {
            record: ExceptionRecord64 {
                code: f.u32(0)?,
                flags: f.u32(4)?,
                record: f.u64(8)?,
                address: f.u64(16)?,
                number_parameters: f.u32(24)?,
                information,
            },
            first_chance: f.u32(152)?,
        })
    }

    fn write(&self, w: &mut FieldsMut<'_>) {
        w.u32(0, self.record.code);
        w.u32(4, self.record.flags);
        w.u64(8, self.record.record);
        w.u64(16, self.record.address);
        w.u32(24, self.record.number_parameters);
        for (i, v) in self.record.information.iter().enumerate() {
            w.u64(32 + 8 * i, *v);
        }
        w.u32(152, self.first_chance);
    }
}

/// DBGKD_LOAD_SYMBOLS64 (40 bytes of the union) plus the path that follows the 240-byte
/// structure.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadSymbols64 {
    /// PathNameLength @0: bytes of path after the structure, NUL included. Kept as sent;
    /// [`Self::path`] is bounded by it and by the packet.
    pub path_name_length: u32,
    /// BaseOfDll @8 (sign-extended on 32-bit targets; all-ones = "unload all").
    pub base_of_dll: u64,
    /// ProcessId @16 (T2: an x86 XP kernel sends 0x00000000ffffffff, not sign-extended).
    pub process_id: u64,
    /// CheckSum @24.
    pub checksum: u32,
    /// SizeOfImage @28.
    pub size_of_image: u32,
    /// UnloadSymbols @32 (a BOOLEAN byte).
    pub unload_symbols: u8,
    /// The path bytes as sent (normally ANSI, NUL-terminated).
    pub path: Vec<u8>,
}

impl LoadSymbols64 {
    /// A load notification for an image at `base`; `path` is stored NUL-terminated and
    /// PathNameLength counts the NUL (as real kernels send it).
    pub fn load(base_of_dll: u64, size_of_image: u32, checksum: u32, path: &str) -> Self {
        let mut p = path.as_bytes().to_vec();
        p.push(0);
        Self {
            path_name_length: p.len() as u32,
            base_of_dll,
            process_id: 0,
            checksum,
            size_of_image,
            unload_symbols: 0,
            path: p,
        }
    }

    /// The "unload all symbols" notification of a reboot (BaseOfDll -1, ProcessId 0, no path).
    pub fn unload_all() -> Self {
        Self {
            base_of_dll: KD_REBOOT,
            unload_symbols: 1,
            ..Default::default()
        }
    }

    /// Whether this unloads rather than loads.
    pub fn is_unload(&self) -> bool {
        self.unload_symbols != 0
    }

    /// The path up to the first NUL, lossily decoded.
    pub fn path_str(&self) -> String {
        let end = self
            .path
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.path.len());
        String::from_utf8_lossy(self.path.get(..end).unwrap_or(&[])).into_owned()
    }

    fn parse(f: &Fields<'_>, data: &[u8]) -> Result<(Self, usize), PayloadError> {
        let path_name_length = f.u32(0)?;
        let n = (path_name_length as usize).min(data.len());
        Ok((
            Self {
                path_name_length,
                base_of_dll: f.u64(8)?,
                process_id: f.u64(16)?,
                checksum: f.u32(24)?,
                size_of_image: f.u32(28)?,
                unload_symbols: f.u8(32)?,
                path: data.get(..n).unwrap_or(&[]).to_vec(),
            },
            n,
        ))
    }

    fn write(&self, w: &mut FieldsMut<'_>) {
        w.u32(0, self.path_name_length);
        w.u64(8, self.base_of_dll);
        w.u64(16, self.process_id);
        w.u32(24, self.checksum);
        w.u32(28, self.size_of_image);
        w.u8(32, self.unload_symbols);
    }
}

/// DBGKD_COMMAND_STRING (64 bytes of the union) plus the strings that follow the structure
/// (`name\0command\0`, KdpCommandString).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandString64 {
    /// Flags @0.
    pub flags: u32,
    /// Reserved1 @4.
    pub reserved1: u32,
    /// Reserved2[7] @8.
    pub reserved2: [u64; 7],
    /// All data after the structure, as sent.
    pub strings: Vec<u8>,
}

impl CommandString64 {
    /// A command string state change carrying `name` and `command`.
    pub fn new(name: &str, command: &str) -> Self {
        let mut strings = name.as_bytes().to_vec();
        strings.push(0);
        strings.extend_from_slice(command.as_bytes());
        strings.push(0);
        Self {
            strings,
            ..Default::default()
        }
    }

    fn part(&self, i: usize) -> String {
        let s = self.strings.split(|&b| b == 0).nth(i).unwrap_or(&[]);
        String::from_utf8_lossy(s).into_owned()
    }

    /// The first NUL-terminated string (the name), lossily decoded.
    pub fn name(&self) -> String {
        self.part(0)
    }

    /// The second NUL-terminated string (the command), lossily decoded.
    pub fn command(&self) -> String {
        self.part(1)
    }

    fn parse(f: &Fields<'_>, data: &[u8]) -> Result<Self, PayloadError> {
        let mut reserved2 = [0u64; 7];
        for (i, slot) in reserved2.iter_mut().enumerate() {
            *slot = f.u64(8 + 8 * i)?;
        }
        Ok(Self {
            flags: f.u32(0)?,
            reserved1: f.u32(4)?,
            reserved2,
            strings: data.to_vec(),
        })
    }

    fn write(&self, w: &mut FieldsMut<'_>) {
        w.u32(0, self.flags);
        w.u32(4, self.reserved1);
        for (i, v) in self.reserved2.iter().enumerate() {
            w.u64(8 + 8 * i, *v);
        }
    }
}

/// The union of a state change, by NewState (the alternate bit ignored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateInfo {
    /// NewState 0x3030.
    Exception(Exception64),
    /// NewState 0x3031.
    LoadSymbols(LoadSymbols64),
    /// NewState 0x3032.
    CommandString(CommandString64),
    /// Any other NewState: the union is only in [`StateChange::union_bytes`].
    Unknown,
}

impl StateInfo {
    /// The NewState value this variant is sent with (0 for `Unknown`).
    pub fn new_state(&self) -> u32 {
        match self {
            StateInfo::Exception(_) => new_state::EXCEPTION,
            StateInfo::LoadSymbols(_) => new_state::LOAD_SYMBOLS,
            StateInfo::CommandString(_) => new_state::COMMAND_STRING,
            StateInfo::Unknown => 0,
        }
    }
}

impl StateInfo {
    fn write_fields(&self, union: &mut [u8; STATE_CHANGE_UNION_SIZE]) {
        let mut w = FieldsMut::new(union);
        match self {
            StateInfo::Exception(e) => e.write(&mut w),
            StateInfo::LoadSymbols(l) => l.write(&mut w),
            StateInfo::CommandString(c) => c.write(&mut w),
            StateInfo::Unknown => {}
        }
    }

    /// Zeroes the union bytes this variant's fields cover.
    fn clear_fields(&self, union: &mut [u8; STATE_CHANGE_UNION_SIZE]) {
        let blank = match self {
            StateInfo::Exception(_) => StateInfo::Exception(Exception64::default()),
            StateInfo::LoadSymbols(_) => StateInfo::LoadSymbols(LoadSymbols64::default()),
            StateInfo::CommandString(_) => StateInfo::CommandString(CommandString64::default()),
            StateInfo::Unknown => StateInfo::Unknown,
        };
        blank.write_fields(union);
    }
}

/// AMD64_DBGKD_CONTROL_REPORT (48 bytes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Amd64ControlReport {
    /// Dr6 @0.
    pub dr6: u64,
    /// Dr7 @8.
    pub dr7: u64,
    /// EFlags @16.
    pub eflags: u32,
    /// InstructionCount @20: valid bytes of `instruction_stream`.
    pub instruction_count: u16,
    /// ReportFlags @22 (see [`report_flags`]).
    pub report_flags: u16,
    /// InstructionStream[16] @24: code at PC with debugger breakpoints removed.
    pub instruction_stream: [u8; 16],
    /// SegCs @40.
    pub seg_cs: u16,
    /// SegDs @42.
    pub seg_ds: u16,
    /// SegEs @44.
    pub seg_es: u16,
    /// SegFs @46.
    pub seg_fs: u16,
}

/// X86_DBGKD_CONTROL_REPORT (40 bytes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct X86ControlReport {
    /// Dr6 @0.
    pub dr6: u32,
    /// Dr7 @4.
    pub dr7: u32,
    /// InstructionCount @8.
    pub instruction_count: u16,
    /// ReportFlags @10 (see [`report_flags`]).
    pub report_flags: u16,
    /// InstructionStream[16] @12.
    pub instruction_stream: [u8; 16],
    /// SegCs @28.
    pub seg_cs: u16,
    /// SegDs @30.
    pub seg_ds: u16,
    /// SegEs @32.
    pub seg_es: u16,
    /// SegFs @34.
    pub seg_fs: u16,
    /// EFlags @36.
    pub eflags: u32,
}

/// The control report of a state change, decoded for the target's architecture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlReport {
    /// AMD64 layout.
    Amd64(Amd64ControlReport),
    /// x86 layout.
    X86(X86ControlReport),
}

impl ControlReport {
    /// Decodes the 48-byte area for `arch`.
    pub fn parse(arch: Arch, raw: &[u8; CONTROL_REPORT_SIZE]) -> Self {
        let f = Fields::new(raw, "control report");
        // Every offset below lies inside the fixed 48-byte array: the defaults never apply.
        match arch {
            Arch::Amd64 => ControlReport::Amd64(Amd64ControlReport {
                dr6: f.u64(0).unwrap_or(0),
                dr7: f.u64(8).unwrap_or(0),
                eflags: f.u32(16).unwrap_or(0),
                instruction_count: f.u16(20).unwrap_or(0),
                report_flags: f.u16(22).unwrap_or(0),
                instruction_stream: f.bytes_at(24).unwrap_or([0; 16]),
                seg_cs: f.u16(40).unwrap_or(0),
                seg_ds: f.u16(42).unwrap_or(0),
                seg_es: f.u16(44).unwrap_or(0),
                seg_fs: f.u16(46).unwrap_or(0),
            }),
            Arch::X86 => ControlReport::X86(X86ControlReport {
                dr6: f.u32(0).unwrap_or(0),
                dr7: f.u32(4).unwrap_or(0),
                instruction_count: f.u16(8).unwrap_or(0),
                report_flags: f.u16(10).unwrap_or(0),
                instruction_stream: f.bytes_at(12).unwrap_or([0; 16]),
                seg_cs: f.u16(28).unwrap_or(0),
                seg_ds: f.u16(30).unwrap_or(0),
                seg_es: f.u16(32).unwrap_or(0),
                seg_fs: f.u16(34).unwrap_or(0),
                eflags: f.u32(36).unwrap_or(0),
            }),
        }
    }

    /// Writes the report over `raw` (x86 leaves bytes 40..48 untouched).
    pub fn write(&self, raw: &mut [u8; CONTROL_REPORT_SIZE]) {
        let mut w = FieldsMut::new(raw);
        match self {
            ControlReport::Amd64(r) => {
                w.u64(0, r.dr6);
                w.u64(8, r.dr7);
                w.u32(16, r.eflags);
                w.u16(20, r.instruction_count);
                w.u16(22, r.report_flags);
                w.put(24, &r.instruction_stream);
                w.u16(40, r.seg_cs);
                w.u16(42, r.seg_ds);
                w.u16(44, r.seg_es);
                w.u16(46, r.seg_fs);
            }
            ControlReport::X86(r) => {
                w.u32(0, r.dr6);
                w.u32(4, r.dr7);
                w.u16(8, r.instruction_count);
                w.u16(10, r.report_flags);
                w.put(12, &r.instruction_stream);
                w.u16(28, r.seg_cs);
                w.u16(30, r.seg_ds);
                w.u16(32, r.seg_es);
                w.u16(34, r.seg_fs);
                w.u32(36, r.eflags);
            }
        }
    }

    /// Dr6.
    pub fn dr6(&self) -> u64 {
        match self {
            ControlReport::Amd64(r) => r.dr6,
            ControlReport::X86(r) => u64::from(r.dr6),
        }
    }

    /// Dr7 (what a host passes back in Continue2).
    pub fn dr7(&self) -> u64 {
        match self {
            ControlReport::Amd64(r) => r.dr7,
            ControlReport::X86(r) => u64::from(r.dr7),
        }
    }

    /// EFlags.
    pub fn eflags(&self) -> u32 {
        match self {
            ControlReport::Amd64(r) => r.eflags,
            ControlReport::X86(r) => r.eflags,
        }
    }

    /// ReportFlags.
    pub fn report_flags(&self) -> u16 {
        match self {
            ControlReport::Amd64(r) => r.report_flags,
            ControlReport::X86(r) => r.report_flags,
        }
    }

    /// The valid instruction bytes at PC (InstructionCount of them, at most 16).
    pub fn instructions(&self) -> &[u8] {
        let (count, stream) = match self {
            ControlReport::Amd64(r) => (r.instruction_count, &r.instruction_stream),
            ControlReport::X86(r) => (r.instruction_count, &r.instruction_stream),
        };
        stream
            .get(..usize::from(count).min(stream.len()))
            .unwrap_or(&[])
    }

    /// (CS, DS, ES, FS).
    pub fn segments(&self) -> (u16, u16, u16, u16) {
        match self {
            ControlReport::Amd64(r) => (r.seg_cs, r.seg_ds, r.seg_es, r.seg_fs),
            ControlReport::X86(r) => (r.seg_cs, r.seg_ds, r.seg_es, r.seg_fs),
        }
    }
}

/// A decoded STATE_CHANGE64 payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateChange {
    /// NewState @0, as sent (may carry [`new_state::ALTERNATE`]).
    pub new_state: u32,
    /// ProcessorLevel @4.
    pub processor_level: u16,
    /// Processor @6: the CPU that stopped.
    pub processor: u16,
    /// NumberProcessors @8.
    pub number_processors: u32,
    /// Alignment padding @12, kept for byte-exact re-encoding.
    pub padding: u32,
    /// Thread @16 (KTHREAD address).
    pub thread: u64,
    /// ProgramCounter @24.
    pub program_counter: u64,
    /// The typed union, chosen by NewState.
    pub info: StateInfo,
    /// The 160 union bytes that no field of `info` covers (padding, and the junk real kernels
    /// leave there), as received; the covered bytes are zero after a parse and ignored on
    /// encode, which writes the fields of `info` over this array. Zero when built.
    pub union_bytes: [u8; STATE_CHANGE_UNION_SIZE],
    /// The 48-byte control report, raw (see [`StateChange::control_report`]).
    pub control_report_bytes: [u8; CONTROL_REPORT_SIZE],
    /// Data after the structure that `info` does not own (exception trace data, or bytes past
    /// a LoadSymbols path).
    pub extra: Vec<u8>,
}

impl StateChange {
    /// A state change built from scratch (simulator): one processor, zero padding.
    pub fn new(info: StateInfo, thread: u64, program_counter: u64) -> Self {
        Self {
            new_state: info.new_state(),
            processor_level: 0,
            processor: 0,
            number_processors: 1,
            padding: 0,
            thread,
            program_counter,
            info,
            union_bytes: [0; STATE_CHANGE_UNION_SIZE],
            control_report_bytes: [0; CONTROL_REPORT_SIZE],
            extra: Vec::new(),
        }
    }

    /// An exception stop (first chance) at `address`.
    pub fn exception(code: u32, address: u64, thread: u64, program_counter: u64) -> Self {
        Self::new(
            StateInfo::Exception(Exception64::new(code, address)),
            thread,
            program_counter,
        )
    }

    /// Builder: the reporting CPU and the CPU count.
    pub fn with_processor(mut self, processor: u16, number_processors: u32) -> Self {
        self.processor = processor;
        self.number_processors = number_processors;
        self
    }

    /// Builder: the control report.
    pub fn with_control_report(mut self, report: &ControlReport) -> Self {
        self.set_control_report(report);
        self
    }

    /// Parses a STATE_CHANGE64 payload (at least 240 bytes).
    pub fn parse(payload: &[u8]) -> Result<Self, PayloadError> {
        let f = Fields::new(payload, "DBGKD_ANY_WAIT_STATE_CHANGE");
        f.slice(0, STATE_CHANGE_SIZE)?;
        let new_state = f.u32(0)?;
        let raw_union: [u8; STATE_CHANGE_UNION_SIZE] = f.bytes_at(UNION_OFFSET)?;
        let u = Fields::new(&raw_union, "DBGKD_ANY_WAIT_STATE_CHANGE union");
        let data = f.rest(STATE_CHANGE_SIZE);
        let (info, owned) = match new_state & !new_state::ALTERNATE {
            new_state::EXCEPTION => (StateInfo::Exception(Exception64::parse(&u)?), 0),
            new_state::LOAD_SYMBOLS => {
                let (ls, n) = LoadSymbols64::parse(&u, data)?;
                (StateInfo::LoadSymbols(ls), n)
            }
            new_state::COMMAND_STRING => (
                StateInfo::CommandString(CommandString64::parse(&u, data)?),
                data.len(),
            ),
            _ => (StateInfo::Unknown, 0),
        };
        // Keep only the bytes no typed field covers: a parsed value then equals a built one.
        let mut union_bytes = raw_union;
        info.clear_fields(&mut union_bytes);
        Ok(Self {
            new_state,
            processor_level: f.u16(4)?,
            processor: f.u16(6)?,
            number_processors: f.u32(8)?,
            padding: f.u32(12)?,
            thread: f.u64(16)?,
            program_counter: f.u64(24)?,
            info,
            union_bytes,
            control_report_bytes: f.bytes_at(REPORT_OFFSET)?,
            extra: data.get(owned..).unwrap_or(&[]).to_vec(),
        })
    }

    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; STATE_CHANGE_SIZE];
        let mut w = FieldsMut::new(&mut out);
        w.u32(0, self.new_state);
        w.u16(4, self.processor_level);
        w.u16(6, self.processor);
        w.u32(8, self.number_processors);
        w.u32(12, self.padding);
        w.u64(16, self.thread);
        w.u64(24, self.program_counter);
        let mut u = self.union_bytes;
        self.info.write_fields(&mut u);
        w.put(UNION_OFFSET, &u);
        w.put(REPORT_OFFSET, &self.control_report_bytes);
        match &self.info {
            StateInfo::LoadSymbols(l) => out.extend_from_slice(&l.path),
            StateInfo::CommandString(c) => out.extend_from_slice(&c.strings),
            _ => {}
        }
        out.extend_from_slice(&self.extra);
        out
    }

    /// NewState without the alternate bit.
    pub fn kind(&self) -> u32 {
        self.new_state & !new_state::ALTERNATE
    }

    /// Whether DbgKdAlternateStateChange is set.
    pub fn is_alternate(&self) -> bool {
        self.new_state & new_state::ALTERNATE != 0
    }

    /// The control report decoded for `arch`.
    pub fn control_report(&self, arch: Arch) -> ControlReport {
        ControlReport::parse(arch, &self.control_report_bytes)
    }

    /// Replaces the control report.
    pub fn set_control_report(&mut self, report: &ControlReport) {
        report.write(&mut self.control_report_bytes);
    }

    /// The exception, for an exception state change.
    pub fn exception_info(&self) -> Option<&Exception64> {
        match &self.info {
            StateInfo::Exception(e) => Some(e),
            _ => None,
        }
    }

    /// The load/unload notification, for a LoadSymbols state change.
    pub fn load_symbols(&self) -> Option<&LoadSymbols64> {
        match &self.info {
            StateInfo::LoadSymbols(l) => Some(l),
            _ => None,
        }
    }

    /// The exception code, for an exception state change.
    pub fn exception_code(&self) -> Option<u32> {
        self.exception_info().map(|e| e.record.code)
    }

    /// A breakpoint exception (STATUS_BREAKPOINT).
    pub fn is_breakpoint(&self) -> bool {
        self.exception_code() == Some(status::BREAKPOINT)
    }

    /// A single-step exception (STATUS_SINGLE_STEP).
    pub fn is_single_step(&self) -> bool {
        self.exception_code() == Some(status::SINGLE_STEP)
    }

    /// "Unload all symbols": the system is going down for a reboot (LoadSymbols, UnloadSymbols
    /// set, BaseOfDll -1). A 32-bit target that failed to sign-extend (0xffffffff) counts too.
    pub fn is_unload_all(&self) -> bool {
        self.load_symbols().is_some_and(|l| {
            l.is_unload() && (l.base_of_dll == KD_REBOOT || l.base_of_dll == 0xFFFF_FFFF)
        })
    }

    /// "Unload all" for hibernation (BaseOfDll -2).
    pub fn is_hibernate(&self) -> bool {
        self.load_symbols().is_some_and(|l| {
            l.is_unload() && (l.base_of_dll == KD_HIBERNATE || l.base_of_dll == 0xFFFF_FFFE)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_round_trips() {
        let sc = StateChange::new(
            StateInfo::LoadSymbols(LoadSymbols64::load(0x1000, 0x2000, 7, "a.sys")),
            1,
            2,
        );
        let bytes = sc.encode();
        assert_eq!(bytes.len(), 246);
        assert_eq!(StateChange::parse(&bytes).unwrap(), sc);
    }

    #[test]
    fn short_payload_is_an_error() {
        assert!(StateChange::parse(&[0u8; 239]).is_err());
    }
}
