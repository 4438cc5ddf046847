//! Walking PsLoadedModuleList: the kernel's circular list of KLDR_DATA_TABLE_ENTRY, in load
//! order, starting with the kernel and the HAL.
//!
//! Offsets (kd-protocol.md 2.3; the same in ReactOS's LDR_DATA_TABLE_ENTRY):
//! - x64: InLoadOrderLinks @0, DllBase @0x30, EntryPoint @0x38, SizeOfImage @0x40,
//!   FullDllName @0x48, BaseDllName @0x58 (UNICODE_STRING: Length u16, MaximumLength u16,
//!   Buffer u64 @+8).
//! - x86: InLoadOrderLinks @0, DllBase @0x18, EntryPoint @0x1C, SizeOfImage @0x20,
//!   FullDllName @0x24, BaseDllName @0x2C (Buffer u32 @+4).

use std::collections::HashSet;
use std::fmt;

use kdpilot_kd::Arch;

use crate::bytes::{le_u16, le_u32, le_u64};
use crate::memory::{MemoryReader, MemoryReaderExt, ReadError};

/// Bounds on a walk of target data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalkLimits {
    /// The most entries followed (a real system has a few hundred).
    pub max_modules: usize,
    /// The most bytes of one UNICODE_STRING read (its Length is cut to this).
    pub max_name_bytes: usize,
}

impl Default for WalkLimits {
    fn default() -> Self {
        WalkLimits {
            max_modules: 2048,
            max_name_bytes: 520,
        }
    }
}

/// One KLDR_DATA_TABLE_ENTRY as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LdrEntry {
    /// Address of the entry itself.
    pub entry_address: u64,
    /// DllBase.
    pub base: u64,
    /// SizeOfImage.
    pub size: u32,
    /// EntryPoint.
    pub entry_point: u64,
    /// FullDllName (`\SystemRoot\system32\ntoskrnl.exe`), lossy.
    pub full_name: String,
    /// BaseDllName (`ntoskrnl.exe`), lossy.
    pub base_name: String,
}

/// Something odd met during a walk that did not stop it from returning what it had.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WalkWarning {
    /// An entry was met a second time: the list loops without returning to its head.
    Cycle {
        /// The entry met again.
        entry: u64,
    },
    /// The walk stopped at the entry limit.
    TooManyEntries {
        /// The limit.
        limit: usize,
    },
    /// An entry (or the link to it) could not be read; the walk stopped there.
    UnreadableEntry {
        /// The entry's address.
        entry: u64,
    },
    /// A Flink was NULL; the walk stopped there.
    NullLink {
        /// The entry whose Flink was NULL.
        entry: u64,
    },
    /// A name could not be read or was out of bounds; it is left empty or cut.
    BadName {
        /// The entry.
        entry: u64,
    },
}

impl fmt::Display for WalkWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalkWarning::Cycle { entry } => write!(
                f,
                "the module list loops back to entry {entry:#x} without reaching its head; stopped there"
            ),
            WalkWarning::TooManyEntries { limit } => {
                write!(f, "the module list has more than {limit} entries; stopped there")
            }
            WalkWarning::UnreadableEntry { entry } => write!(
                f,
                "module list entry {entry:#x} is not readable; the list is cut there"
            ),
            WalkWarning::NullLink { entry } => {
                write!(f, "module list entry {entry:#x} has a NULL Flink; the list is cut there")
            }
            WalkWarning::BadName { entry } => {
                write!(f, "the name of module list entry {entry:#x} is unreadable or too long")
            }
        }
    }
}

/// What a walk found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModuleListWalk {
    /// Entries in list order.
    pub entries: Vec<LdrEntry>,
    /// What was odd.
    pub warnings: Vec<WalkWarning>,
}

/// KLDR_DATA_TABLE_ENTRY offsets for one architecture.
struct Layout {
    dll_base: usize,
    entry_point: usize,
    size_of_image: usize,
    full_name: usize,
    base_name: usize,
    /// Bytes read per entry.
    entry_len: usize,
}

fn layout(arch: Arch) -> Layout {
    match arch {
        Arch::Amd64 => Layout {
            dll_base: 0x30,
            entry_point: 0x38,
            size_of_image: 0x40,
            full_name: 0x48,
            base_name: 0x58,
            entry_len: 0x68,
        },
        Arch::X86 => Layout {
            dll_base: 0x18,
            entry_point: 0x1C,
            size_of_image: 0x20,
            full_name: 0x24,
            base_name: 0x2C,
            entry_len: 0x34,
        },
    }
}

fn pointer_at(arch: Arch, b: &[u8], off: usize) -> Option<u64> {
    match arch {
        Arch::Amd64 => le_u64(b, off),
        Arch::X86 => le_u32(b, off).map(|v| arch.canonical_address(u64::from(v))),
    }
}

/// A UNICODE_STRING's (Length, Buffer).
fn unicode_string_at(arch: Arch, b: &[u8], off: usize) -> Option<(u16, u64)> {
    let len = le_u16(b, off)?;
    let buf = match arch {
        Arch::Amd64 => pointer_at(arch, b, off + 8)?,
        Arch::X86 => pointer_at(arch, b, off + 4)?,
    };
    Some((len, buf))
}

/// Reads a UNICODE_STRING's text; `None` when it could not be read in full or was cut.
async fn read_unicode<R: MemoryReader>(
    reader: &mut R,
    len: u16,
    buffer: u64,
    limit: usize,
) -> Result<(String, bool), ReadError> {
    if len == 0 || buffer == 0 {
        return Ok((String::new(), len == 0));
    }
    let want = (usize::from(len) & !1).min(limit & !1);
    let bytes = reader.read(buffer, want).await?;
    let ok = bytes.len() == usize::from(len) && len % 2 == 0;
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    Ok((String::from_utf16_lossy(&units), ok))
}

/// Walks the module list whose head (a LIST_ENTRY, e.g. PsLoadedModuleList) is at `list_head`.
///
/// Stops, with a warning and the entries read so far, at a cycle, the entry limit, an
/// unreadable entry or a NULL link. Fails only when the head itself cannot be read or the
/// reader fails.
pub async fn walk_module_list<R: MemoryReader>(
    reader: &mut R,
    arch: Arch,
    list_head: u64,
    limits: &WalkLimits,
) -> Result<ModuleListWalk, ReadError> {
    let lay = layout(arch);
    let head = arch.canonical_address(list_head);
    let mut walk = ModuleListWalk::default();
    let mut cur = reader.read_pointer(arch, head).await?;
    let mut seen = HashSet::new();
    let mut prev = head;
    while cur != head {
        if cur == 0 {
            walk.warnings.push(WalkWarning::NullLink { entry: prev });
            break;
        }
        if walk.entries.len() >= limits.max_modules {
            walk.warnings.push(WalkWarning::TooManyEntries {
                limit: limits.max_modules,
            });
            break;
        }
        if !seen.insert(cur) {
            walk.warnings.push(WalkWarning::Cycle { entry: cur });
            break;
        }
        let raw = match reader.read_exact(cur, lay.entry_len).await {
            Ok(b) => b,
            Err(ReadError::Unreadable { .. }) => {
                walk.warnings
                    .push(WalkWarning::UnreadableEntry { entry: cur });
                break;
            }
            Err(e) => return Err(e),
        };
        let field = |off| pointer_at(arch, &raw, off).unwrap_or(0);
        let flink = field(0);
        let base = field(lay.dll_base);
        let entry_point = field(lay.entry_point);
        let size = le_u32(&raw, lay.size_of_image).unwrap_or(0);
        let mut names = [String::new(), String::new()];
        for (slot, off) in names.iter_mut().zip([lay.full_name, lay.base_name]) {
            let (len, buf) = unicode_string_at(arch, &raw, off).unwrap_or((0, 0));
            match read_unicode(reader, len, buf, limits.max_name_bytes).await {
                Ok((s, ok)) => {
                    if !ok && !walk.warnings.contains(&WalkWarning::BadName { entry: cur }) {
                        walk.warnings.push(WalkWarning::BadName { entry: cur });
                    }
                    *slot = s;
                }
                Err(ReadError::Unreadable { .. }) => {
                    walk.warnings.push(WalkWarning::BadName { entry: cur })
                }
                Err(e) => return Err(e),
            }
        }
        let [full_name, base_name] = names;
        walk.entries.push(LdrEntry {
            entry_address: cur,
            base,
            size,
            entry_point,
            full_name,
            base_name,
        });
        prev = cur;
        cur = flink;
    }
    Ok(walk)
}

/// The name WinDbg gives a module: `nt` for the kernel (the entry at KernBase, or the first),
/// `hal` for the HAL, otherwise the file name without its extension.
pub fn windbg_module_name(base_name: &str, is_kernel: bool) -> String {
    if is_kernel {
        return "nt".to_string();
    }
    let file = base_name.rsplit(['\\', '/']).next().unwrap_or(base_name);
    let lower = file.to_ascii_lowercase();
    if lower.starts_with("hal") && lower.ends_with(".dll") {
        return "hal".to_string();
    }
    let stem = match file.rfind('.') {
        Some(i) if i > 0 => &file[..i],
        _ => file,
    };
    let cleaned: String = stem
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.is_empty() {
        "unknown".to_string()
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windbg_names() {
        assert_eq!(windbg_module_name("ntoskrnl.exe", true), "nt");
        assert_eq!(windbg_module_name("hal.dll", false), "hal");
        assert_eq!(windbg_module_name("halmacpi.dll", false), "hal");
        assert_eq!(windbg_module_name("Ntfs.sys", false), "Ntfs");
        assert_eq!(windbg_module_name("leakydrv.sys", false), "leakydrv");
        assert_eq!(windbg_module_name("my-drv.v2.sys", false), "my_drv_v2");
        assert_eq!(windbg_module_name("", false), "unknown");
        assert_eq!(windbg_module_name(".sys", false), "_sys");
    }
}
