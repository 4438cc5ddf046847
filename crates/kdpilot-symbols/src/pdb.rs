//! What kdpilot takes from a PDB: its identity, names (publics, procedures, global data), the
//! function table for address lookups, x86 frame data, and source lines on demand.
//!
//! Everything but source lines is extracted once when the PDB is loaded; the PDB bytes are kept
//! so that lines can be looked up later (pdb-addr2line's context borrows the parsed PDB, so it
//! is rebuilt per batch of lookups and the answers are cached).

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::{Arc, Mutex};

use pdb2::FallibleIterator;

use crate::ids::{Guid, PdbId, PdbSignature};

/// Why a PDB was not used.
#[derive(Debug, thiserror::Error)]
pub enum PdbError {
    /// The file is not a readable PDB.
    #[error("cannot parse the PDB: {0}")]
    Parse(String),
    /// The PDB is not the one the image was linked with.
    #[error(
        "{name} does not match the image: the image wants {wanted_signature} age {wanted_age}, \
         the PDB is {found_signature} age {found_age}"
    )]
    Mismatch {
        /// The PDB's file name.
        name: String,
        /// The signature the image records.
        wanted_signature: PdbSignature,
        /// The age the image records.
        wanted_age: u32,
        /// The PDB's signature.
        found_signature: PdbSignature,
        /// The PDB's age.
        found_age: u32,
    },
}

impl From<pdb2::Error> for PdbError {
    fn from(e: pdb2::Error) -> Self {
        PdbError::Parse(e.to_string())
    }
}

/// How an x86 frame data record describes its frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// Old FPO record (no program).
    Fpo,
    /// Kernel trap frame.
    Trap,
    /// Task state segment.
    Tss,
    /// Standard EBP frame.
    Standard,
    /// "New FPO": a program string describes the frame.
    FrameData,
    /// Unknown type.
    Unknown,
}

/// One x86 frame data record (FPO or "new FPO"), with RVAs already translated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameRecord {
    /// First RVA covered.
    pub rva: u32,
    /// Bytes covered.
    pub code_size: u32,
    /// Local variable bytes.
    pub locals_size: u32,
    /// Parameter bytes.
    pub params_size: u32,
    /// Saved register bytes.
    pub saved_regs_size: u32,
    /// Prologue bytes.
    pub prolog_size: u32,
    /// Whether EBP is the frame pointer.
    pub uses_base_pointer: bool,
    /// Kind of record.
    pub kind: FrameKind,
    /// The program string, if any.
    pub program: Option<String>,
}

/// A source position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceLine {
    /// The file as the PDB records it.
    pub file: String,
    /// The line.
    pub line: u32,
}

/// A function (or public code symbol) in the lookup table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionSymbol {
    /// Start RVA.
    pub rva: u32,
    /// Size, when known.
    pub size: Option<u32>,
    /// Name as displayed (undecorated for x86 C publics).
    pub name: Arc<str>,
}

/// The symbols of one module, from its PDB.
pub struct ModuleSymbols {
    bytes: Arc<[u8]>,
    signature: PdbSignature,
    age: u32,
    is_x86: bool,
    functions: Vec<FunctionSymbol>,
    names: HashMap<String, u32>,
    names_lower: HashMap<String, u32>,
    frames: Vec<FrameRecord>,
    lines: Mutex<HashMap<u32, Option<SourceLine>>>,
    /// The parsed streams pdb-addr2line needs, kept for line lookups (a `Context` borrows
    /// them, so one is made per batch of lookups).
    line_data: Mutex<Option<LineData>>,
    /// The line tables made the PDB parser panic once: no more line lookups.
    lines_broken: std::sync::atomic::AtomicBool,
}

type LineData = pdb_addr2line::ContextPdbData<'static, 'static, Cursor<Arc<[u8]>>>;

impl std::fmt::Debug for ModuleSymbols {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleSymbols")
            .field("signature", &self.signature)
            .field("age", &self.age)
            .field("is_x86", &self.is_x86)
            .field("functions", &self.functions.len())
            .field("names", &self.names.len())
            .field("frames", &self.frames.len())
            .finish_non_exhaustive()
    }
}

/// Strips x86 C decorations: `_Name@12` (stdcall), `@Name@8` (fastcall), `_Name` (cdecl).
/// C++ names (`?...`) and undecorated names give `None`.
pub fn undecorate_x86(name: &str) -> Option<&str> {
    let rest = name.strip_prefix('_').or_else(|| name.strip_prefix('@'))?;
    if rest.is_empty() {
        return None;
    }
    let plain = match rest.rfind('@') {
        Some(i)
            if i > 0 && i + 1 < rest.len() && rest[i + 1..].bytes().all(|b| b.is_ascii_digit()) =>
        {
            &rest[..i]
        }
        _ => rest,
    };
    Some(plain)
}

impl ModuleSymbols {
    /// Parses a PDB. When `expected` is given the PDB must match it (GUID or signature, and
    /// age), otherwise [`PdbError::Mismatch`] names both.
    ///
    /// The PDB comes from a symbol server or a cache, so it is hostile input: a panic inside
    /// the PDB crates (pdb2's debug assertions fire on some corrupt line tables, found by the
    /// `symbols_pdb` fuzz target) is caught and reported as [`PdbError::Parse`].
    pub fn parse(bytes: impl Into<Arc<[u8]>>, expected: Option<&PdbId>) -> Result<Self, PdbError> {
        let bytes: Arc<[u8]> = bytes.into();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Self::parse_unguarded(bytes, expected)
        }))
        .unwrap_or_else(|p| Err(PdbError::Parse(panic_text("parsing the PDB", &*p))))
    }

    fn parse_unguarded(bytes: Arc<[u8]>, expected: Option<&PdbId>) -> Result<Self, PdbError> {
        let mut pdb = pdb2::PDB::open(Cursor::new(bytes.clone()))?;
        let info = pdb.pdb_information()?;
        let dbi = pdb.debug_information()?;
        let age = dbi.age().unwrap_or(info.age);
        let (d1, d2, d3, d4) = info.guid.as_fields();
        let guid = Guid::from_fields(d1, d2, d3, *d4);
        let signature = match expected.map(|e| e.signature) {
            Some(PdbSignature::Timestamp(_)) => PdbSignature::Timestamp(info.signature),
            _ => PdbSignature::Guid(guid),
        };
        if let Some(want) = expected {
            if want.signature != signature || want.age != age {
                return Err(PdbError::Mismatch {
                    name: want.name.clone(),
                    wanted_signature: want.signature,
                    wanted_age: want.age,
                    found_signature: signature,
                    found_age: age,
                });
            }
        }
        let is_x86 = matches!(dbi.machine_type(), Ok(pdb2::MachineType::X86));
        let address_map = pdb.address_map()?;

        // Names: every public (code and data) and global data symbol.
        let mut names: HashMap<String, u32> = HashMap::new();
        let globals = pdb.global_symbols()?;
        let mut iter = globals.iter();
        while let Some(sym) = iter.next()? {
            let (name, offset) = match sym.parse() {
                Ok(pdb2::SymbolData::Public(p)) => (p.name, p.offset),
                Ok(pdb2::SymbolData::Data(d)) => (d.name, d.offset),
                _ => continue,
            };
            let Some(rva) = offset.to_rva(&address_map) else {
                continue;
            };
            let name = name.to_string();
            if is_x86 {
                if let Some(plain) = undecorate_x86(&name) {
                    names.entry(plain.to_string()).or_insert(rva.0);
                }
            }
            names.entry(name.into_owned()).or_insert(rva.0);
        }

        // x86 frame data.
        let mut frames = Vec::new();
        if is_x86 {
            let strings = pdb.string_table().ok();
            if let Ok(table) = pdb.frame_table() {
                let mut it = table.iter();
                while let Ok(Some(f)) = it.next() {
                    let Some(rva) = f.code_start.to_rva(&address_map) else {
                        continue;
                    };
                    let program = match (f.program, strings.as_ref()) {
                        (Some(p), Some(st)) => p.to_string_lossy(st).ok().map(|s| s.into_owned()),
                        _ => None,
                    };
                    frames.push(FrameRecord {
                        rva: rva.0,
                        code_size: f.code_size,
                        locals_size: f.locals_size,
                        params_size: f.params_size,
                        saved_regs_size: u32::from(f.saved_regs_size),
                        prolog_size: u32::from(f.prolog_size),
                        uses_base_pointer: f.uses_base_pointer,
                        kind: match f.ty {
                            pdb2::FrameType::FPO => FrameKind::Fpo,
                            pdb2::FrameType::Trap => FrameKind::Trap,
                            pdb2::FrameType::TSS => FrameKind::Tss,
                            pdb2::FrameType::Standard => FrameKind::Standard,
                            pdb2::FrameType::FrameData => FrameKind::FrameData,
                            _ => FrameKind::Unknown,
                        },
                        program,
                    });
                }
            }
            frames.sort_by_key(|f| f.rva);
        }
        drop(pdb);

        // Functions: procedures and code publics, through pdb-addr2line.
        let pdb = pdb2::PDB::open(Cursor::new(bytes.clone()))?;
        let data = pdb_addr2line::ContextPdbData::try_from_pdb(pdb)
            .map_err(|e| PdbError::Parse(e.to_string()))?;
        let ctx = data
            .make_context_with_formatter_flags(formatter_flags())
            .map_err(|e| PdbError::Parse(e.to_string()))?;
        let mut functions: Vec<FunctionSymbol> = Vec::with_capacity(ctx.function_count());
        for f in ctx.functions() {
            let Some(name) = f.name else { continue };
            let shown = if is_x86 {
                undecorate_x86(&name).map(str::to_string).unwrap_or(name)
            } else {
                name
            };
            names.entry(shown.clone()).or_insert(f.start_rva);
            functions.push(FunctionSymbol {
                rva: f.start_rva,
                size: f.end_rva.and_then(|e| e.checked_sub(f.start_rva)),
                name: shown.into(),
            });
        }
        functions.sort_by_key(|f| f.rva);
        functions.dedup_by_key(|f| f.rva);
        drop(ctx);

        let names_lower = names.iter().map(|(k, &v)| (k.to_lowercase(), v)).collect();
        Ok(ModuleSymbols {
            bytes,
            signature,
            age,
            is_x86,
            functions,
            names,
            names_lower,
            frames,
            lines: Mutex::new(HashMap::new()),
            line_data: Mutex::new(Some(data)),
            lines_broken: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The PDB's signature.
    pub fn signature(&self) -> PdbSignature {
        self.signature
    }

    /// The PDB's age (from the DBI stream).
    pub fn age(&self) -> u32 {
        self.age
    }

    /// Whether the PDB is for x86 code.
    pub fn is_x86(&self) -> bool {
        self.is_x86
    }

    /// The function table, sorted by RVA.
    pub fn functions(&self) -> &[FunctionSymbol] {
        &self.functions
    }

    /// The RVA of `name` (exact, then the x86-undecorated form, then case-insensitive, as
    /// WinDbg matches).
    pub fn rva_of(&self, name: &str) -> Option<u32> {
        self.names
            .get(name)
            .or_else(|| self.names_lower.get(&name.to_lowercase()))
            .copied()
    }

    /// All names, for completion or wildcard matching.
    pub fn names(&self) -> impl Iterator<Item = (&str, u32)> {
        self.names.iter().map(|(k, &v)| (k.as_str(), v))
    }

    /// The function containing `rva` (or the nearest one before it, as WinDbg shows
    /// `symbol+offset` for any address past a symbol).
    pub fn function_at(&self, rva: u32) -> Option<&FunctionSymbol> {
        let idx = self.functions.partition_point(|f| f.rva <= rva);
        self.functions.get(idx.checked_sub(1)?)
    }

    /// The x86 frame data record covering `rva`.
    pub fn frame_record(&self, rva: u32) -> Option<&FrameRecord> {
        let idx = self.frames.partition_point(|f| f.rva <= rva);
        let f = self.frames.get(idx.checked_sub(1)?)?;
        (u64::from(rva) < u64::from(f.rva) + u64::from(f.code_size)).then_some(f)
    }

    /// All frame data records, sorted by RVA.
    pub fn frame_records(&self) -> &[FrameRecord] {
        &self.frames
    }

    /// The source line of `rva`, if the PDB has line information for it.
    pub fn source_line(&self, rva: u32) -> Option<SourceLine> {
        self.source_lines(&[rva]).pop().flatten()
    }

    /// Source lines for several RVAs at once (one PDB context for all misses).
    pub fn source_lines(&self, rvas: &[u32]) -> Vec<Option<SourceLine>> {
        let mut cache = match self.lines.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let missing: Vec<u32> = rvas
            .iter()
            .copied()
            .filter(|r| !cache.contains_key(r))
            .collect();
        if !missing.is_empty() {
            let found = self.lookup_lines(&missing);
            for (rva, line) in missing.into_iter().zip(found) {
                cache.insert(rva, line);
            }
        }
        rvas.iter()
            .map(|r| cache.get(r).cloned().flatten())
            .collect()
    }

    fn lookup_lines(&self, rvas: &[u32]) -> Vec<Option<SourceLine>> {
        use std::sync::atomic::Ordering;
        let none = || vec![None; rvas.len()];
        if self.lines_broken.load(Ordering::Relaxed) {
            return none();
        }
        let mut guard = match self.line_data.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.lookup_lines_in(&mut guard, rvas)
        }));
        match found {
            Ok(lines) => lines,
            Err(p) => {
                tracing::warn!(
                    "{}: no source lines from this PDB",
                    panic_text("reading the PDB's line tables", &*p)
                );
                *guard = None;
                self.lines_broken.store(true, Ordering::Relaxed);
                none()
            }
        }
    }

    fn lookup_lines_in(
        &self,
        guard: &mut Option<LineData>,
        rvas: &[u32],
    ) -> Vec<Option<SourceLine>> {
        let none = || vec![None; rvas.len()];
        if guard.is_none() {
            let Ok(pdb) = pdb2::PDB::open(Cursor::new(self.bytes.clone())) else {
                return none();
            };
            *guard = pdb_addr2line::ContextPdbData::try_from_pdb(pdb).ok();
        }
        let Some(data) = guard.as_ref() else {
            return none();
        };
        let Ok(ctx) = data.make_context_with_formatter_flags(formatter_flags()) else {
            return none();
        };
        rvas.iter()
            .map(|&rva| {
                let frames = ctx.find_frames(rva).ok()??;
                let f = frames.frames.first()?;
                Some(SourceLine {
                    file: f.file.as_deref()?.to_string(),
                    line: f.line?,
                })
            })
            .collect()
    }
}

/// A caught panic as text for a message.
fn panic_text(what: &str, payload: &(dyn std::any::Any + Send)) -> String {
    let detail = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("the PDB crates panicked while {what} (a corrupt PDB): {detail}")
}

fn formatter_flags() -> pdb_addr2line::TypeFormatterFlags {
    use pdb_addr2line::TypeFormatterFlags as F;
    F::NO_FUNCTION_RETURN | F::NO_MEMBER_FUNCTION_STATIC | F::NAME_ONLY | F::NO_ARGUMENTS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x86_undecoration() {
        assert_eq!(
            undecorate_x86("_ExAllocatePoolWithTag@12"),
            Some("ExAllocatePoolWithTag")
        );
        assert_eq!(
            undecorate_x86("@KfAcquireSpinLock@4"),
            Some("KfAcquireSpinLock")
        );
        assert_eq!(undecorate_x86("_memset"), Some("memset"));
        assert_eq!(undecorate_x86("_DbgBreakPoint@0"), Some("DbgBreakPoint"));
        assert_eq!(undecorate_x86("_a@b"), Some("a@b"));
        assert_eq!(undecorate_x86("?f@@YAXXZ"), None);
        assert_eq!(undecorate_x86("plain"), None);
        assert_eq!(undecorate_x86("_"), None);
        assert_eq!(undecorate_x86("_x@"), Some("x@"));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(ModuleSymbols::parse(vec![0u8; 4096], None).is_err());
        assert!(ModuleSymbols::parse(Vec::new(), None).is_err());
    }
}
