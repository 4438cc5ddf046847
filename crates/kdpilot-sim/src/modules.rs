//! PsLoadedModuleList: a circular doubly-linked list of KLDR_DATA_TABLE_ENTRY in target memory,
//! laid out here from the protocol sheet's offsets (kd-protocol.md 2.3) and the kernel's
//! KLDR_DATA_TABLE_ENTRY, not through kdpilot's parser of it.
//!
//! x64: InLoadOrderLinks @0, ExceptionTable @0x10, ExceptionTableSize @0x18, DllBase @0x30,
//! EntryPoint @0x38, SizeOfImage @0x40, FullDllName @0x48, BaseDllName @0x58, Flags @0x68,
//! LoadCount @0x6C, CheckSum @0x78, TimeDateStamp @0x9C; 0xA0 bytes.
//! x86: InLoadOrderLinks @0, ExceptionTable @8, ExceptionTableSize @0xC, DllBase @0x18,
//! EntryPoint @0x1C, SizeOfImage @0x20, FullDllName @0x24, BaseDllName @0x2C, Flags @0x34,
//! LoadCount @0x38, CheckSum @0x40, TimeDateStamp @0x58; 0x5C bytes. The fields a debugger
//! reads (DllBase .. BaseDllName) sit where ReactOS's LDR_DATA_TABLE_ENTRY has them too
//! (its InMemoryOrderLinks/InInitializationOrderLinks occupy the kernel's ExceptionTable..
//! NonPagedDebugInfo slots).
//! UNICODE_STRING: Length u16, MaximumLength u16, (pad to pointer alignment), Buffer pointer.

use kdpilot_kd::Arch;

use crate::loader::LoadedImage;
use crate::memory::{Memory, Pool};

/// Offsets of one KLDR_DATA_TABLE_ENTRY layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryLayout {
    /// Bytes per entry.
    pub size: u64,
    /// ExceptionTable (pointer to the image's `.pdata`).
    pub exception_table: u64,
    /// ExceptionTableSize (u32, bytes).
    pub exception_table_size: u64,
    /// DllBase.
    pub dll_base: u64,
    /// EntryPoint.
    pub entry_point: u64,
    /// SizeOfImage (u32).
    pub size_of_image: u64,
    /// FullDllName (UNICODE_STRING).
    pub full_dll_name: u64,
    /// BaseDllName (UNICODE_STRING).
    pub base_dll_name: u64,
    /// Flags (u32).
    pub flags: u64,
    /// LoadCount (u16).
    pub load_count: u64,
    /// CheckSum (u32).
    pub checksum: u64,
    /// TimeDateStamp (u32).
    pub time_date_stamp: u64,
}

impl EntryLayout {
    /// The layout for `arch`.
    pub fn for_arch(arch: Arch) -> Self {
        match arch {
            Arch::Amd64 => Self {
                size: 0xA0,
                exception_table: 0x10,
                exception_table_size: 0x18,
                dll_base: 0x30,
                entry_point: 0x38,
                size_of_image: 0x40,
                full_dll_name: 0x48,
                base_dll_name: 0x58,
                flags: 0x68,
                load_count: 0x6C,
                checksum: 0x78,
                time_date_stamp: 0x9C,
            },
            Arch::X86 => Self {
                size: 0x5C,
                exception_table: 0x08,
                exception_table_size: 0x0C,
                dll_base: 0x18,
                entry_point: 0x1C,
                size_of_image: 0x20,
                full_dll_name: 0x24,
                base_dll_name: 0x2C,
                flags: 0x34,
                load_count: 0x38,
                checksum: 0x40,
                time_date_stamp: 0x58,
            },
        }
    }
}

/// LDRP_ENTRY_PROCESSED | LDRP_IMAGE_DLL-ish flags a loaded kernel module carries.
const ENTRY_FLAGS: u32 = 0x0900_4000;

/// Writes a pointer of the target's width.
pub fn write_ptr(memory: &mut Memory, arch: Arch, at: u64, value: u64) {
    match arch {
        Arch::Amd64 => memory.write_u64(at, value),
        Arch::X86 => memory.write_u32(at, value as u32),
    }
}

/// Reads a pointer of the target's width (sign-extended on x86, as the wire carries it).
pub fn read_ptr(memory: &Memory, arch: Arch, at: u64) -> Option<u64> {
    match arch {
        Arch::Amd64 => memory.read_u64(at),
        Arch::X86 => memory
            .read_u32(at)
            .map(|v| arch.canonical_address(u64::from(v))),
    }
}

/// Writes a UNICODE_STRING at `at` whose text is allocated from `pool`.
pub fn write_unicode_string(memory: &mut Memory, pool: &mut Pool, arch: Arch, at: u64, text: &str) {
    let utf16: Vec<u8> = text
        .encode_utf16()
        .chain(std::iter::once(0))
        .flat_map(u16::to_le_bytes)
        .collect();
    let buffer = pool.alloc(memory, utf16.len() as u64);
    memory.write(buffer, &utf16);
    let length = (utf16.len() - 2) as u16;
    memory.write_u16(at, length);
    memory.write_u16(at + 2, length + 2);
    write_ptr(memory, arch, at + arch.pointer_size() as u64, buffer);
}

/// Lays out PsLoadedModuleList at `head` (a LIST_ENTRY: Flink, Blink) with one entry per
/// image, in load order. Returns the entries' addresses.
pub fn write_module_list(
    memory: &mut Memory,
    pool: &mut Pool,
    arch: Arch,
    head: u64,
    images: &[LoadedImage],
) -> Vec<u64> {
    let l = EntryLayout::for_arch(arch);
    let p = arch.pointer_size() as u64;
    let entries: Vec<u64> = images.iter().map(|_| pool.alloc(memory, l.size)).collect();
    for (i, (img, &e)) in images.iter().zip(&entries).enumerate() {
        let next = entries.get(i + 1).copied().unwrap_or(head);
        let prev = if i == 0 { head } else { entries[i - 1] };
        write_ptr(memory, arch, e, next);
        write_ptr(memory, arch, e + p, prev);
        let (pdata, pdata_size) = img.exception_directory;
        if pdata != 0 && pdata_size != 0 {
            write_ptr(
                memory,
                arch,
                e + l.exception_table,
                img.base + u64::from(pdata),
            );
            memory.write_u32(e + l.exception_table_size, pdata_size);
        }
        write_ptr(memory, arch, e + l.dll_base, img.base);
        write_ptr(
            memory,
            arch,
            e + l.entry_point,
            img.entry_point().unwrap_or(0),
        );
        memory.write_u32(e + l.size_of_image, img.size);
        write_unicode_string(memory, pool, arch, e + l.full_dll_name, &img.path);
        write_unicode_string(memory, pool, arch, e + l.base_dll_name, &img.name);
        memory.write_u32(e + l.flags, ENTRY_FLAGS);
        memory.write_u16(e + l.load_count, 1);
        memory.write_u32(e + l.checksum, img.checksum);
        memory.write_u32(e + l.time_date_stamp, img.time_date_stamp);
    }
    let first = entries.first().copied().unwrap_or(head);
    let last = entries.last().copied().unwrap_or(head);
    write_ptr(memory, arch, head, first);
    write_ptr(memory, arch, head + p, last);
    entries
}
