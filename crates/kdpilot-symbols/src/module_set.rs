//! The loaded modules of a target, with what is known of each (headers read from memory, local
//! image file, PDB symbols, exports), and the name lookups in both directions.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use kdpilot_kd::Arch;

use crate::ids::{ImageId, PdbId};
use crate::memory::{MemoryReader, ReadError};
use crate::modules::{walk_module_list, windbg_module_name, LdrEntry, WalkLimits, WalkWarning};
use crate::pdb::{ModuleSymbols, SourceLine};
use crate::pe::{self, CodeViewInfo, Export, PeError, PeFile, PeHeaders};

/// What GetVersion (DBGKD_GET_VERSION64) tells about the kernel, as plain values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelInfo {
    /// The target's architecture (from MachineType).
    pub arch: Arch,
    /// KernBase.
    pub kern_base: u64,
    /// PsLoadedModuleList (the address of the list head).
    pub ps_loaded_module_list: u64,
}

/// Where a module's symbols stand, as `lm` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SymbolStatus {
    /// Not looked for yet.
    Deferred,
    /// A matching PDB is loaded.
    Pdb(PathBuf),
    /// No PDB; names come from the export table.
    Exports,
    /// No PDB was found (the reason says where it was looked for).
    NotFound(String),
    /// A PDB was found but does not match (the message names both identities).
    Mismatch(String),
    /// The module's headers or CodeView record could not be read or were refused.
    Unusable(String),
}

impl fmt::Display for SymbolStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SymbolStatus::Deferred => f.write_str("deferred"),
            SymbolStatus::Pdb(p) => write!(f, "pdb symbols  {}", p.display()),
            SymbolStatus::Exports => f.write_str("export symbols"),
            SymbolStatus::NotFound(why) => write!(f, "no symbols ({why})"),
            SymbolStatus::Mismatch(why) => write!(f, "mismatched symbols ({why})"),
            SymbolStatus::Unusable(why) => write!(f, "no symbols ({why})"),
        }
    }
}

/// One loaded module.
#[derive(Clone, Debug)]
pub struct Module {
    /// The name WinDbg gives it (`nt`, `hal`, `leakydrv`), unique in its set.
    pub name: String,
    /// BaseDllName (`ntoskrnl.exe`).
    pub file_name: String,
    /// FullDllName.
    pub path: String,
    /// Load address.
    pub base: u64,
    /// SizeOfImage as the module list has it.
    pub size: u32,
    /// Headers read from target memory.
    pub headers: Option<PeHeaders>,
    /// The CodeView record read from target memory.
    pub codeview: Option<CodeViewInfo>,
    /// What went wrong reading this module's headers.
    pub problems: Vec<String>,
    /// The image file, from a symbol store or disk.
    pub image: Option<Arc<PeFile>>,
    /// PDB symbols.
    pub symbols: Option<Arc<ModuleSymbols>>,
    /// Exports (sorted by RVA), when there is no PDB.
    pub exports: Option<Arc<Vec<Export>>>,
    /// Symbol state for `lm`.
    pub symbol_status: SymbolStatus,
}

impl Module {
    /// A module known only by name, base and size (tests, or headers not yet read).
    pub fn new(
        name: impl Into<String>,
        file_name: impl Into<String>,
        base: u64,
        size: u32,
    ) -> Self {
        let file_name = file_name.into();
        Module {
            name: name.into(),
            path: file_name.clone(),
            file_name,
            base,
            size,
            headers: None,
            codeview: None,
            problems: Vec::new(),
            image: None,
            symbols: None,
            exports: None,
            symbol_status: SymbolStatus::Deferred,
        }
    }

    /// Whether `address` is inside the module.
    pub fn contains(&self, address: u64) -> bool {
        address >= self.base && address - self.base < u64::from(self.size)
    }

    /// The RVA of `address`, if inside.
    pub fn rva(&self, address: u64) -> Option<u32> {
        self.contains(address).then(|| (address - self.base) as u32)
    }

    /// The PDB the image in memory names (sanitised).
    pub fn pdb_id(&self) -> Option<Result<PdbId, crate::ids::FileNameError>> {
        self.codeview.as_ref().map(CodeViewInfo::pdb_id)
    }

    /// The image's store identity under its BaseDllName.
    pub fn image_id(&self) -> Option<Result<ImageId, crate::ids::FileNameError>> {
        self.headers.as_ref().map(|h| h.image_id(&self.file_name))
    }

    /// Headers from the best source: target memory, else the local image.
    pub fn best_headers(&self) -> Option<&PeHeaders> {
        self.headers
            .as_ref()
            .or_else(|| self.image.as_deref().map(PeFile::headers))
    }

    /// Whether `address` is in an executable section (unknown layout: anywhere inside).
    pub fn is_code(&self, address: u64) -> bool {
        match (self.rva(address), self.best_headers()) {
            (Some(rva), Some(h)) => h.is_executable_rva(rva),
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// Reads this module's PE headers and CodeView record from target memory (bounded reads).
    /// Problems are recorded in [`problems`](Self::problems); only a failing reader is an
    /// error.
    pub async fn read_headers<R: MemoryReader>(&mut self, reader: &mut R) -> Result<(), ReadError> {
        match pe::read_headers(reader, self.base).await {
            Ok(h) => {
                if h.size_of_image != self.size {
                    self.problems.push(format!(
                        "SizeOfImage {:#x} in the headers differs from {:#x} in the module list",
                        h.size_of_image, self.size
                    ));
                }
                match pe::read_codeview(reader, self.base, &h).await {
                    Ok(cv) => self.codeview = cv,
                    Err(PeError::Read(ReadError::Failed(f))) => return Err(ReadError::Failed(f)),
                    Err(err) => self.problems.push(format!("CodeView record: {err}")),
                }
                self.headers = Some(h);
            }
            Err(PeError::Read(ReadError::Failed(f))) => return Err(ReadError::Failed(f)),
            Err(err) => self.problems.push(format!("PE headers: {err}")),
        }
        if let Some(Err(e)) = self.pdb_id() {
            self.symbol_status = SymbolStatus::Unusable(e.to_string());
        }
        Ok(())
    }

    /// Attaches a local image file, checking that it is this module's (TimeDateStamp and
    /// SizeOfImage as the headers in memory have them).
    pub fn attach_image(&mut self, image: PeFile) -> Result<(), String> {
        if let Some(h) = &self.headers {
            let f = image.headers();
            if f.time_date_stamp != h.time_date_stamp || f.size_of_image != h.size_of_image {
                return Err(format!(
                    "image file for {} is {:08X}{:x}, the module in memory is {:08X}{:x}",
                    self.name,
                    f.time_date_stamp,
                    f.size_of_image,
                    h.time_date_stamp,
                    h.size_of_image
                ));
            }
        }
        self.image = Some(Arc::new(image));
        Ok(())
    }

    /// Attaches PDB symbols (already checked against the CodeView record by the caller or by
    /// [`ModuleSymbols::parse`]).
    pub fn attach_symbols(&mut self, symbols: ModuleSymbols, path: PathBuf) {
        self.symbols = Some(Arc::new(symbols));
        self.symbol_status = SymbolStatus::Pdb(path);
    }

    /// Uses `exports` for names (when there is no PDB).
    pub fn attach_exports(&mut self, mut exports: Vec<Export>) {
        exports.sort_by_key(|e| e.rva);
        self.exports = Some(Arc::new(exports));
        if self.symbols.is_none() {
            self.symbol_status = SymbolStatus::Exports;
        }
    }

    /// The RVA of `symbol`: PDB names first, then exports.
    pub fn rva_of(&self, symbol: &str) -> Option<u32> {
        if let Some(rva) = self.symbols.as_ref().and_then(|s| s.rva_of(symbol)) {
            return Some(rva);
        }
        let exports = self.exports.as_ref()?;
        exports
            .iter()
            .find(|e| e.name.as_deref() == Some(symbol))
            .or_else(|| {
                exports.iter().find(|e| {
                    e.name
                        .as_deref()
                        .is_some_and(|n| n.eq_ignore_ascii_case(symbol))
                })
            })
            .map(|e| e.rva)
    }

    /// The symbol at or before `rva`: (name, its RVA).
    pub fn symbol_at(&self, rva: u32) -> Option<(Arc<str>, u32)> {
        if let Some(f) = self
            .symbols
            .as_ref()
            .and_then(|s| s.function_at(rva).cloned())
        {
            return Some((f.name, f.rva));
        }
        let exports = self.exports.as_ref()?;
        let idx = exports.partition_point(|e| e.rva <= rva);
        exports[..idx]
            .iter()
            .rev()
            .find_map(|e| Some((Arc::from(e.name.as_deref()?), e.rva)))
    }
}

/// Where an address is, for display: `module!symbol+0xoff`, `module+0xoff` or the bare address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// The address described.
    pub address: u64,
    /// The module's WinDbg name.
    pub module: Option<String>,
    /// The symbol.
    pub symbol: Option<Arc<str>>,
    /// Offset from the symbol, or from the module base when there is no symbol.
    pub offset: u64,
    /// Source line, when the PDB has it.
    pub source: Option<SourceLine>,
}

impl Location {
    /// `nt!Foo+0x12 [d:\src\foo.c @ 42]`, the way WinDbg appends source lines.
    pub fn with_source(&self) -> String {
        match &self.source {
            Some(s) => format!("{self} [{} @ {}]", s.file, s.line),
            None => self.to_string(),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.module, &self.symbol) {
            (Some(m), Some(s)) if self.offset == 0 => write!(f, "{m}!{s}"),
            (Some(m), Some(s)) => write!(f, "{m}!{s}+{:#x}", self.offset),
            (Some(m), None) => write!(f, "{m}+{:#x}", self.offset),
            _ => write!(f, "{:#x}", self.address),
        }
    }
}

/// Why a name did not resolve.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// No module has that name.
    #[error("no module named {0:?} is loaded")]
    UnknownModule(String),
    /// The module has no symbol of that name.
    #[error("{module}!{symbol} not found ({why})")]
    UnknownSymbol {
        /// The module.
        module: String,
        /// The symbol.
        symbol: String,
        /// Which sources were searched.
        why: String,
    },
    /// The expression is not `module!symbol[+offset]`, `module` or `symbol`.
    #[error("cannot parse {0:?}: expected module!symbol[+offset]")]
    BadExpression(String),
}

/// A target's modules, sorted by base, with unique WinDbg names.
#[derive(Clone, Debug, Default)]
pub struct ModuleSet {
    arch: Option<Arch>,
    modules: Vec<Module>,
}

impl ModuleSet {
    /// A set of `modules` (sorted here; duplicate names get `_<base>` like WinDbg's).
    pub fn new(arch: Option<Arch>, mut modules: Vec<Module>) -> Self {
        modules.sort_by_key(|m| m.base);
        let mut seen = std::collections::HashSet::new();
        for m in &mut modules {
            if !seen.insert(m.name.to_lowercase()) {
                m.name = format!("{}_{:x}", m.name, m.base);
                seen.insert(m.name.to_lowercase());
            }
        }
        ModuleSet { arch, modules }
    }

    /// Builds the set from module list entries without reading anything more: names, bases
    /// and sizes only. Read headers later, per module, with [`Module::read_headers`] (about
    /// 1.2 KB over the link per module).
    pub fn from_entries_deferred(kernel: &KernelInfo, entries: &[LdrEntry]) -> Self {
        let kern_base = kernel.arch.canonical_address(kernel.kern_base);
        let has_kernel_entry = entries.iter().any(|e| e.base == kern_base);
        let modules = entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let is_kernel = e.base == kern_base || (!has_kernel_entry && i == 0);
                let mut m = Module::new(
                    windbg_module_name(&e.base_name, is_kernel),
                    e.base_name.clone(),
                    e.base,
                    e.size,
                );
                m.path = e.full_name.clone();
                m
            })
            .collect();
        ModuleSet::new(Some(kernel.arch), modules)
    }

    /// Builds the set from module list entries: names, plus headers and CodeView records read
    /// from target memory. Per-module failures land in [`Module::problems`]; only a failing
    /// reader stops it.
    pub async fn from_entries<R: MemoryReader>(
        reader: &mut R,
        kernel: &KernelInfo,
        entries: &[LdrEntry],
    ) -> Result<Self, ReadError> {
        let mut set = Self::from_entries_deferred(kernel, entries);
        for m in &mut set.modules {
            m.read_headers(reader).await?;
        }
        Ok(set)
    }

    /// Walks PsLoadedModuleList and reads each module's headers: the whole of `lm`'s input.
    pub async fn from_target<R: MemoryReader>(
        reader: &mut R,
        kernel: &KernelInfo,
        limits: &WalkLimits,
    ) -> Result<(Self, Vec<WalkWarning>), ReadError> {
        let walk =
            walk_module_list(reader, kernel.arch, kernel.ps_loaded_module_list, limits).await?;
        let set = Self::from_entries(reader, kernel, &walk.entries).await?;
        Ok((set, walk.warnings))
    }

    /// The architecture, when known.
    pub fn arch(&self) -> Option<Arch> {
        self.arch
    }

    /// The modules, sorted by base.
    pub fn modules(&self) -> &[Module] {
        &self.modules
    }

    /// The modules, mutably (to attach files).
    pub fn modules_mut(&mut self) -> &mut [Module] {
        &mut self.modules
    }

    /// The module containing `address`.
    pub fn find(&self, address: u64) -> Option<&Module> {
        let idx = self.modules.partition_point(|m| m.base <= address);
        let m = self.modules.get(idx.checked_sub(1)?)?;
        m.contains(address).then_some(m)
    }

    /// The module named `name` (WinDbg name or file name, case-insensitive).
    pub fn by_name(&self, name: &str) -> Option<&Module> {
        self.modules
            .iter()
            .find(|m| m.name.eq_ignore_ascii_case(name))
            .or_else(|| {
                self.modules
                    .iter()
                    .find(|m| m.file_name.eq_ignore_ascii_case(name))
            })
    }

    /// Mutable access by name.
    pub fn by_name_mut(&mut self, name: &str) -> Option<&mut Module> {
        let idx = self
            .modules
            .iter()
            .position(|m| m.name.eq_ignore_ascii_case(name))?;
        self.modules.get_mut(idx)
    }

    /// Absolute ranges that can be cached across stops (headers and read-only sections of every
    /// module with headers), for [`CachedReader::mark_stable`](crate::CachedReader::mark_stable).
    pub fn stable_ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for m in &self.modules {
            if let Some(h) = &m.headers {
                for (rva, len) in h.stable_rva_ranges() {
                    if u64::from(rva) < u64::from(m.size) {
                        out.push((m.base.wrapping_add(u64::from(rva)), u64::from(len)));
                    }
                }
            }
        }
        out
    }

    /// Resolves `module!symbol[+offset]`, `module` (its base) or a bare `symbol` (searched in
    /// every module, `nt` first). Offsets are hex, with or without `0x`, as in WinDbg.
    pub fn resolve(&self, expr: &str) -> Result<u64, NameError> {
        let expr = expr.trim();
        let bad = || NameError::BadExpression(expr.to_string());
        let (head, offset) = match expr.split_once('+') {
            Some((h, off)) => {
                let off = off.trim();
                let digits = off
                    .strip_prefix("0x")
                    .or_else(|| off.strip_prefix("0X"))
                    .unwrap_or(off);
                (
                    h.trim(),
                    u64::from_str_radix(digits, 16).map_err(|_| bad())?,
                )
            }
            None => (expr, 0),
        };
        if head.is_empty() {
            return Err(bad());
        }
        let base = match head.split_once('!') {
            Some((module, symbol)) => {
                let m = self
                    .by_name(module)
                    .ok_or_else(|| NameError::UnknownModule(module.to_string()))?;
                if symbol.is_empty() {
                    return Err(bad());
                }
                let rva = m.rva_of(symbol).ok_or_else(|| NameError::UnknownSymbol {
                    module: m.name.clone(),
                    symbol: symbol.to_string(),
                    why: match (&m.symbols, &m.exports) {
                        (Some(_), _) => "searched the PDB and exports".to_string(),
                        (None, Some(_)) => "no PDB loaded; searched the exports".to_string(),
                        (None, None) => format!("no symbols loaded: {}", m.symbol_status),
                    },
                })?;
                m.base.wrapping_add(u64::from(rva))
            }
            None => {
                if let Some(m) = self.by_name(head) {
                    m.base
                } else {
                    let mut order: Vec<&Module> = self.modules.iter().collect();
                    order.sort_by_key(|m| m.name != "nt");
                    order
                        .iter()
                        .find_map(|m| Some(m.base.wrapping_add(u64::from(m.rva_of(head)?))))
                        .ok_or_else(|| NameError::UnknownSymbol {
                            module: "*".to_string(),
                            symbol: head.to_string(),
                            why: "searched every loaded module".to_string(),
                        })?
                }
            }
        };
        Ok(base.wrapping_add(offset))
    }

    /// Describes `address`. With `is_return_address`, the symbol and line are looked up at
    /// `address - 1` (a call's return address can be the first byte of the next function) while
    /// the offset is still counted from `address`, as WinDbg prints it.
    pub fn describe(&self, address: u64, is_return_address: bool) -> Location {
        self.describe_all(&[(address, is_return_address)])
            .pop()
            .unwrap_or(Location {
                address,
                module: None,
                symbol: None,
                offset: 0,
                source: None,
            })
    }

    /// [`describe`](Self::describe) for many addresses (a stack): source lines are looked up
    /// in one batch per module.
    pub fn describe_all(&self, addresses: &[(u64, bool)]) -> Vec<Location> {
        let probes: Vec<(u64, Option<&Module>)> = addresses
            .iter()
            .map(|&(a, ret)| {
                let probe = if ret { a.wrapping_sub(1) } else { a };
                (probe, self.find(probe))
            })
            .collect();
        // Lines, one batch per module.
        let mut lines: Vec<Option<SourceLine>> = vec![None; addresses.len()];
        for m in &self.modules {
            let Some(symbols) = &m.symbols else { continue };
            let idx: Vec<usize> = (0..probes.len())
                .filter(|&i| probes[i].1.is_some_and(|pm| std::ptr::eq(pm, m)))
                .collect();
            if idx.is_empty() {
                continue;
            }
            let rvas: Vec<u32> = idx.iter().map(|&i| (probes[i].0 - m.base) as u32).collect();
            for (i, line) in idx.into_iter().zip(symbols.source_lines(&rvas)) {
                lines[i] = line;
            }
        }
        addresses
            .iter()
            .zip(probes)
            .zip(lines)
            .map(|((&(address, _), (probe, module)), source)| {
                let Some(m) = module else {
                    return Location {
                        address,
                        module: None,
                        symbol: None,
                        offset: 0,
                        source: None,
                    };
                };
                let rva = (probe - m.base) as u32;
                let (symbol, offset) = match m.symbol_at(rva) {
                    Some((name, start)) => {
                        (Some(name), address.wrapping_sub(m.base + u64::from(start)))
                    }
                    None => (None, address.wrapping_sub(m.base)),
                };
                Location {
                    address,
                    module: Some(m.name.clone()),
                    symbol,
                    offset,
                    source,
                }
            })
            .collect()
    }
}
