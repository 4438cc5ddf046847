//! Windows kernel modules, PE images, PDBs, symbol stores and x64/x86 stack unwinding for
//! kdpilot, over any [`MemoryReader`]. This crate knows nothing of KD: the caller supplies a
//! reader of target memory and the values GetVersion gave ([`KernelInfo`]).
//!
//! The pieces, in the order a stop uses them:
//! - [`memory`]: the [`MemoryReader`] trait, [`CachedReader`] (coalescing, caching, counters)
//!   and [`MockMemory`].
//! - [`modules`]: the PsLoadedModuleList walk; [`pe`]: PE headers and CodeView records read
//!   from memory with bounded reads; [`ModuleSet`]: the modules with names like WinDbg's.
//! - [`SymbolPath`] and [`SymbolStore`]: `_NT_SYMBOL_PATH` syntax, symsrv downloads into the
//!   standard store layout, identity checks, progress events.
//! - [`ModuleSymbols`]: names, lines and x86 frame data from a PDB.
//! - [`unwind`]: the stack walkers ([`StackWalker`]), x64 unwind info / x86 frame data, then
//!   frame pointers, then a bounded scan; each [`Frame`] records how it was found.
//!
//! A stop, end to end (`reader` is any [`MemoryReader`] of the stopped target):
//!
//! ```no_run
//! # async fn stop<R: kdpilot_symbols::MemoryReader>(target: R) -> Result<(), Box<dyn std::error::Error>> {
//! use kdpilot_symbols::*;
//! let mut reader = CachedReader::new(target);
//! let kernel = KernelInfo { arch: Arch::Amd64, kern_base: 0xfffff800_02400000, ps_loaded_module_list: 0xfffff800_02410000 };
//! // lm: the module list, headers and CodeView records over the link.
//! let (mut modules, warnings) = ModuleSet::from_target(&mut reader, &kernel, &WalkLimits::default()).await?;
//! for (start, len) in modules.stable_ranges() {
//!     reader.mark_stable(start, len);
//! }
//! // PDBs and image files from the symbol path (downloads land in the store, WinDbg's layout).
//! let store = SymbolStore::new(SymbolPath::parse("srv*C:\\symbols*https://msdl.microsoft.com/download/symbols")?, StoreOptions::default(), None);
//! for m in modules.modules_mut() {
//!     let _ = store.load_module(m).await;
//! }
//! let bp = modules.resolve("nt!ExAllocatePoolWithTag")?;
//! // kb, at a stop whose registers came from GetContext.
//! reader.new_stop();
//! let regs = Registers::X64(X64Registers::new(bp, 0xfffff880_03210000, 0));
//! let trace = StackWalker::new(&modules).walk(&mut reader, regs).await?;
//! println!("{}", trace.format_kb(&modules, true));
//! # let _ = warnings; Ok(()) }
//! ```

pub(crate) mod bytes;
pub mod ids;
pub mod memory;
pub mod module_set;
pub mod modules;
pub mod pdb;
pub mod pe;
#[cfg(feature = "store")]
pub mod store;
pub mod symbol_path;
pub mod unwind;

pub use ids::{sanitize_file_name, FileNameError, Guid, ImageId, PdbId, PdbSignature};
pub use kdpilot_kd::Arch;
pub use memory::{
    CacheConfig, CachedReader, MemoryReader, MemoryReaderExt, MockMemory, ReadError, ReadStats,
};
pub use module_set::{KernelInfo, Location, Module, ModuleSet, NameError, SymbolStatus};
pub use modules::{walk_module_list, LdrEntry, ModuleListWalk, WalkLimits, WalkWarning};
pub use pdb::{ModuleSymbols, PdbError, SourceLine};
pub use pe::{CodeViewInfo, PeError, PeFile, PeHeaders};
#[cfg(feature = "store")]
pub use store::{ModuleLoad, ProgressEvent, ProgressSink, StoreError, StoreOptions, SymbolStore};
pub use symbol_path::{SymbolPath, SymbolPathEntry, SymbolPathError};

pub use unwind::{
    Frame, FrameTrust, Registers, StackTrace, StackWalker, WalkConfig, WalkEnd, X64Register,
    X64Registers, X86Registers,
};
