//! Mapping PE images into target memory, as MmLoadSystemImage does it for a driver: headers
//! and sections at a base of the kernel's choosing (KASLR), base relocations applied for the
//! difference to the preferred base, imports resolved by name against the images already
//! loaded (a driver imports from ntoskrnl.exe), exports recorded.
//!
//! Every field of the file is bounded before use: sizes are checked against the file and the
//! image, the image size is capped ([`MAX_IMAGE_SIZE`]), and the `object` crate's PE readers
//! (which never read out of bounds) walk the tables. The fixtures are ours, but a loader that
//! trusts a header is a loader that panics on the first odd file.

use std::collections::BTreeMap;
use std::sync::Arc;

use kdpilot_kd::Arch;
use object::pe;
use object::read::pe::{
    ExportTarget, ImageNtHeaders, ImageOptionalHeader, Import, ImportTable, RelocationBlockIterator,
};
use object::LittleEndian as LE;

use crate::memory::{Memory, PAGE_SIZE};

/// Largest SizeOfImage the simulator maps (real drivers are far smaller; the cap keeps a header
/// field from deciding how much memory is allocated).
pub const MAX_IMAGE_SIZE: u32 = 64 << 20;

/// How deep export forwarders are followed (`NTOSKRNL.Foo` pointing at another forwarder).
const MAX_FORWARD_DEPTH: usize = 4;

/// Why an image could not be loaded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// The file is not a PE image the loader understands.
    #[error("{name}: not a loadable PE image: {detail}")]
    Malformed {
        /// Image name.
        name: String,
        /// What is wrong.
        detail: String,
    },
    /// The image is for another processor.
    #[error("{name}: machine type {machine:#06x} does not match the {arch} target")]
    WrongMachine {
        /// Image name.
        name: String,
        /// FileHeader.Machine.
        machine: u16,
        /// The target's architecture.
        arch: Arch,
    },
    /// SizeOfImage is zero or beyond [`MAX_IMAGE_SIZE`].
    #[error("{name}: SizeOfImage {size:#x} is not something the simulator maps")]
    BadSize {
        /// Image name.
        name: String,
        /// SizeOfImage.
        size: u32,
    },
    /// The image must move but carries no relocations.
    #[error("{name}: relocations were stripped, so it cannot run at {base:#x}")]
    RelocsStripped {
        /// Image name.
        name: String,
        /// The base it was to be loaded at.
        base: u64,
    },
    /// A base relocation the loader does not apply, or one outside the image.
    #[error("{name}: base relocation type {kind} at RVA {rva:#x} cannot be applied")]
    BadRelocation {
        /// Image name.
        name: String,
        /// IMAGE_REL_BASED_* type.
        kind: u16,
        /// Where.
        rva: u32,
    },
    /// An import names a module that is not loaded, or a function it does not export.
    #[error("{name}: imports {import} from {dll}, which no loaded image provides")]
    UnresolvedImport {
        /// Image name.
        name: String,
        /// The module named by the import descriptor.
        dll: String,
        /// The function name (or `#ordinal`).
        import: String,
    },
}

/// An image file to load: its name in the module list and the file's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSource {
    /// BaseDllName as the module list shows it (`ntoskrnl.exe`, `hal.dll`, `leakydrv.sys`).
    pub name: String,
    /// FullDllName (`\SystemRoot\system32\ntoskrnl.exe`).
    pub path: String,
    /// The file as it is on disk.
    pub file: Arc<[u8]>,
}

impl ImageSource {
    /// A boot image in `\SystemRoot\system32\` (ntoskrnl.exe, hal.dll).
    pub fn system(name: &str, file: impl Into<Arc<[u8]>>) -> Self {
        Self {
            name: name.to_string(),
            path: format!(r"\SystemRoot\system32\{name}"),
            file: file.into(),
        }
    }

    /// A driver in `\SystemRoot\system32\drivers\`.
    pub fn driver(name: &str, file: impl Into<Arc<[u8]>>) -> Self {
        Self {
            name: name.to_string(),
            path: format!(r"\SystemRoot\system32\drivers\{name}"),
            file: file.into(),
        }
    }
}

/// One section of a mapped image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// Name (up to 8 bytes, lossily decoded).
    pub name: String,
    /// VirtualAddress.
    pub rva: u32,
    /// VirtualSize (SizeOfRawData when VirtualSize is 0).
    pub size: u32,
    /// Characteristics (IMAGE_SCN_*).
    pub characteristics: u32,
}

/// An image mapped into target memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedImage {
    /// BaseDllName.
    pub name: String,
    /// FullDllName.
    pub path: String,
    /// Where it is mapped this boot.
    pub base: u64,
    /// SizeOfImage.
    pub size: u32,
    /// OptionalHeader.ImageBase of the file (the base the relocations are relative to).
    pub preferred_base: u64,
    /// AddressOfEntryPoint (RVA, 0 if none).
    pub entry_rva: u32,
    /// OptionalHeader.CheckSum.
    pub checksum: u32,
    /// FileHeader.TimeDateStamp.
    pub time_date_stamp: u32,
    /// The raw file bytes (what a symbol store would serve).
    pub file: Arc<[u8]>,
    /// Sections.
    pub sections: Vec<Section>,
    /// Exported names and their RVAs (forwarded exports are resolved at import time, not here).
    pub exports: BTreeMap<String, u32>,
    /// Exports by ordinal (RVA), forwarded ones excluded.
    pub ordinals: BTreeMap<u16, u32>,
    /// Forwarded exports: name -> `DLL.Name` or `DLL.#ordinal`.
    pub forwarders: BTreeMap<String, String>,
    /// The exception directory (`.pdata`): RVA and size in bytes; (0, 0) if none.
    pub exception_directory: (u32, u32),
    /// How many base relocations were applied.
    pub relocations_applied: usize,
}

impl LoadedImage {
    /// Whether `address` lies inside the mapped image.
    pub fn contains(&self, address: u64) -> bool {
        address >= self.base && address - self.base < u64::from(self.size)
    }

    /// The address of an exported name this boot.
    pub fn export(&self, name: &str) -> Option<u64> {
        self.exports
            .get(name)
            .map(|&rva| self.base + u64::from(rva))
    }

    /// The entry point address, if the image has one.
    pub fn entry_point(&self) -> Option<u64> {
        (self.entry_rva != 0).then(|| self.base + u64::from(self.entry_rva))
    }

    /// The section containing `rva`.
    pub fn section_of(&self, rva: u32) -> Option<&Section> {
        self.sections
            .iter()
            .find(|s| rva >= s.rva && rva - s.rva < s.size.max(1))
    }
}

/// The header facts the loader uses, whatever the PE flavour.
struct Headers {
    machine: u16,
    characteristics: u16,
    image_base: u64,
    size_of_image: u32,
    size_of_headers: u32,
    entry_rva: u32,
    checksum: u32,
    time_date_stamp: u32,
    /// File offset of OptionalHeader.ImageBase (rewritten in the mapped copy).
    image_base_offset: usize,
    directories: Vec<(u32, u32)>,
    /// (section, raw data bounded by the file).
    sections: Vec<(Section, std::ops::Range<usize>)>,
}

fn parse_headers<Pe: ImageNtHeaders>(data: &[u8]) -> Result<Headers, String> {
    let dos = pe::ImageDosHeader::parse(data).map_err(|e| e.to_string())?;
    let nt_offset = u64::from(dos.nt_headers_offset());
    let mut offset = nt_offset;
    let (nt, dirs) = Pe::parse(data, &mut offset).map_err(|e| e.to_string())?;
    let opt = nt.optional_header();
    let sections = nt.sections(data, offset).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for s in sections.iter() {
        let raw_off = s.pointer_to_raw_data.get(LE) as usize;
        let raw_len = s.size_of_raw_data.get(LE) as usize;
        // Raw data is bounded by the file (a section may claim more than the file has).
        let start = raw_off.min(data.len());
        let end = raw_off.saturating_add(raw_len).min(data.len());
        let vsize = s.virtual_size.get(LE);
        let name_len = s.name.iter().position(|&b| b == 0).unwrap_or(s.name.len());
        out.push((
            Section {
                name: String::from_utf8_lossy(s.name.get(..name_len).unwrap_or(&[])).into_owned(),
                rva: s.virtual_address.get(LE),
                size: if vsize == 0 { raw_len as u32 } else { vsize },
                characteristics: s.characteristics.get(LE).0,
            },
            start..end,
        ));
    }
    // ImageBase sits at OptionalHeader + 24 (PE32+, u64) or + 28 (PE32, u32); the optional
    // header follows the 4-byte signature and the 20-byte file header.
    let image_base_offset = nt_offset as usize + 4 + 20 + if nt.is_type_64() { 24 } else { 28 };
    Ok(Headers {
        machine: nt.file_header().machine.get(LE).0,
        characteristics: nt.file_header().characteristics.get(LE).0,
        image_base: opt.image_base(),
        size_of_image: opt.size_of_image(),
        size_of_headers: opt.size_of_headers(),
        entry_rva: opt.address_of_entry_point(),
        checksum: opt.check_sum(),
        time_date_stamp: nt.file_header().time_date_stamp.get(LE),
        image_base_offset,
        directories: dirs
            .iter()
            .map(|d| (d.virtual_address.get(LE), d.size.get(LE)))
            .collect(),
        sections: out,
    })
}

/// Loads `source` at `base` into `memory`: maps SizeOfImage (page granular), copies headers and
/// sections, applies base relocations, resolves imports against `loaded`, and returns what the
/// kernel knows about the image. Nothing is written to memory if loading fails.
pub fn load_image(
    memory: &mut Memory,
    arch: Arch,
    source: &ImageSource,
    base: u64,
    loaded: &[LoadedImage],
) -> Result<LoadedImage, LoadError> {
    let name = source.name.clone();
    let malformed = |detail: String| LoadError::Malformed {
        name: name.clone(),
        detail,
    };
    let data: &[u8] = &source.file;
    let magic =
        object::read::pe::optional_header_magic(data).map_err(|e| malformed(e.to_string()))?;
    let hdr = if magic == pe::IMAGE_NT_OPTIONAL_HDR64_MAGIC {
        parse_headers::<pe::ImageNtHeaders64>(data)
    } else {
        parse_headers::<pe::ImageNtHeaders32>(data)
    }
    .map_err(malformed)?;
    if hdr.machine != arch.machine_type()
        || (magic == pe::IMAGE_NT_OPTIONAL_HDR64_MAGIC) != (arch == Arch::Amd64)
    {
        return Err(LoadError::WrongMachine {
            name,
            machine: hdr.machine,
            arch,
        });
    }
    if hdr.size_of_image == 0 || hdr.size_of_image > MAX_IMAGE_SIZE {
        return Err(LoadError::BadSize {
            name,
            size: hdr.size_of_image,
        });
    }
    if base % PAGE_SIZE != 0 {
        return Err(malformed(format!(
            "load base {base:#x} is not page aligned"
        )));
    }

    // The mapped view, built in a buffer first so a failure leaves memory untouched.
    let mut image = vec![0u8; hdr.size_of_image as usize];
    let headers_len = (hdr.size_of_headers as usize)
        .min(data.len())
        .min(image.len());
    copy_into(&mut image, 0, data.get(..headers_len).unwrap_or(&[]))
        .ok_or_else(|| malformed("headers do not fit the image".into()))?;
    for (s, raw) in &hdr.sections {
        let raw = data.get(raw.clone()).unwrap_or(&[]);
        let n = raw.len().min(s.size as usize);
        copy_into(&mut image, s.rva as usize, raw.get(..n).unwrap_or(&[])).ok_or_else(|| {
            malformed(format!(
                "section {} ({:#x} bytes at RVA {:#x}) lies outside SizeOfImage {:#x}",
                s.name, n, s.rva, hdr.size_of_image
            ))
        })?;
    }

    let delta = base.wrapping_sub(hdr.image_base);
    let directory = |i: usize| hdr.directories.get(i).copied().unwrap_or((0, 0));
    let (reloc_rva, reloc_size) = directory(pe::IMAGE_DIRECTORY_ENTRY_BASERELOC);
    let mut relocations_applied = 0;
    if delta != 0 {
        if reloc_size == 0 {
            if hdr.characteristics & pe::IMAGE_FILE_RELOCS_STRIPPED.0 != 0 {
                return Err(LoadError::RelocsStripped { name, base });
            }
        } else {
            let blocks = slice_rva(&image, reloc_rva, reloc_size)
                .ok_or_else(|| malformed("relocation directory outside the image".into()))?
                .to_vec();
            relocations_applied =
                relocate(&mut image, &blocks, delta, arch).map_err(|(kind, rva)| {
                    LoadError::BadRelocation {
                        name: name.clone(),
                        kind,
                        rva,
                    }
                })?;
        }
    }
    // The mapped headers carry the base the image runs at (the loader rewrites ImageBase).
    match arch {
        Arch::Amd64 => copy_into(&mut image, hdr.image_base_offset, &base.to_le_bytes()),
        Arch::X86 => copy_into(
            &mut image,
            hdr.image_base_offset,
            &(base as u32).to_le_bytes(),
        ),
    }
    .ok_or_else(|| malformed("ImageBase field outside the headers".into()))?;

    let (export_rva, export_size) = directory(pe::IMAGE_DIRECTORY_ENTRY_EXPORT);
    let (exports, ordinals, forwarders) = if export_size == 0 {
        Default::default()
    } else {
        read_exports(&image, export_rva, export_size).map_err(malformed)?
    };

    let (import_rva, import_size) = directory(pe::IMAGE_DIRECTORY_ENTRY_IMPORT);
    if import_rva != 0 && import_size != 0 {
        let slots = match arch {
            Arch::Amd64 => {
                resolve_imports::<pe::ImageNtHeaders64>(&image, import_rva, loaded, &name)?
            }
            Arch::X86 => {
                resolve_imports::<pe::ImageNtHeaders32>(&image, import_rva, loaded, &name)?
            }
        };
        for (rva, value) in slots {
            let ok = match arch {
                Arch::Amd64 => copy_into(&mut image, rva as usize, &value.to_le_bytes()),
                Arch::X86 => copy_into(&mut image, rva as usize, &(value as u32).to_le_bytes()),
            };
            ok.ok_or_else(|| {
                malformed(format!(
                    "import address table slot {rva:#x} outside the image"
                ))
            })?;
        }
    }

    memory.map(base, u64::from(hdr.size_of_image));
    memory.write(base, &image);
    Ok(LoadedImage {
        name: source.name.clone(),
        path: source.path.clone(),
        base,
        size: hdr.size_of_image,
        preferred_base: hdr.image_base,
        entry_rva: hdr.entry_rva,
        checksum: hdr.checksum,
        time_date_stamp: hdr.time_date_stamp,
        file: source.file.clone(),
        sections: hdr.sections.into_iter().map(|(s, _)| s).collect(),
        exports,
        ordinals,
        forwarders,
        exception_directory: directory(pe::IMAGE_DIRECTORY_ENTRY_EXCEPTION),
        relocations_applied,
    })
}

fn copy_into(dst: &mut [u8], at: usize, src: &[u8]) -> Option<()> {
    let end = at.checked_add(src.len())?;
    dst.get_mut(at..end)?.copy_from_slice(src);
    Some(())
}

fn slice_rva(image: &[u8], rva: u32, size: u32) -> Option<&[u8]> {
    let start = rva as usize;
    image.get(start..start.checked_add(size as usize)?)
}

/// Applies DIR64 (x64) and HIGHLOW (x86) relocations; returns how many were applied, or the
/// (type, RVA) of one that cannot be.
fn relocate(image: &mut [u8], blocks: &[u8], delta: u64, arch: Arch) -> Result<usize, (u16, u32)> {
    let mut n = 0;
    let mut it = RelocationBlockIterator::new(blocks);
    while let Some(block) = it.next().map_err(|_| (u16::MAX, 0))? {
        for r in block {
            let rva = r.virtual_address;
            let at = rva as usize;
            match (r.typ, arch) {
                (t, _) if t == pe::IMAGE_REL_BASED_ABSOLUTE => {}
                (t, Arch::Amd64) if t == pe::IMAGE_REL_BASED_DIR64 => {
                    let slot = image.get_mut(at..at + 8).ok_or((t.0, rva))?;
                    let mut v = [0u8; 8];
                    v.copy_from_slice(slot);
                    slot.copy_from_slice(&u64::from_le_bytes(v).wrapping_add(delta).to_le_bytes());
                    n += 1;
                }
                (t, Arch::X86) if t == pe::IMAGE_REL_BASED_HIGHLOW => {
                    let slot = image.get_mut(at..at + 4).ok_or((t.0, rva))?;
                    let mut v = [0u8; 4];
                    v.copy_from_slice(slot);
                    let value = u32::from_le_bytes(v).wrapping_add(delta as u32);
                    slot.copy_from_slice(&value.to_le_bytes());
                    n += 1;
                }
                (t, _) => return Err((t.0, rva)),
            }
        }
    }
    Ok(n)
}

type ExportMaps = (
    BTreeMap<String, u32>,
    BTreeMap<u16, u32>,
    BTreeMap<String, String>,
);

fn read_exports(image: &[u8], rva: u32, size: u32) -> Result<ExportMaps, String> {
    let data = slice_rva(image, rva, size).ok_or("export directory outside the image")?;
    let table = object::read::pe::ExportTable::parse(data, rva).map_err(|e| e.to_string())?;
    let mut names = BTreeMap::new();
    let mut ordinals = BTreeMap::new();
    let mut forwarders = BTreeMap::new();
    for e in table.exports().map_err(|e| e.to_string())? {
        let name = e.name.map(|n| String::from_utf8_lossy(n).into_owned());
        match e.target {
            ExportTarget::Address(a) => {
                ordinals.insert(e.ordinal.0, a);
                if let Some(n) = name {
                    names.insert(n, a);
                }
            }
            ExportTarget::ForwardByName(dll, f) => {
                if let Some(n) = name {
                    let to = format!(
                        "{}.{}",
                        String::from_utf8_lossy(dll),
                        String::from_utf8_lossy(f)
                    );
                    forwarders.insert(n, to);
                }
            }
            ExportTarget::ForwardByOrdinal(dll, o) => {
                if let Some(n) = name {
                    forwarders.insert(n, format!("{}.#{}", String::from_utf8_lossy(dll), o.0));
                }
            }
        }
    }
    Ok((names, ordinals, forwarders))
}

/// Which loaded image a DLL name means: an exact file name, or the name without extension
/// (forwarders say `NTOSKRNL.Foo`).
fn find_module<'a>(loaded: &'a [LoadedImage], dll: &str) -> Option<&'a LoadedImage> {
    let stem = |s: &str| {
        s.rsplit_once('.')
            .map_or(s, |(a, _)| a)
            .to_ascii_lowercase()
    };
    loaded
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(dll))
        .or_else(|| loaded.iter().find(|m| stem(&m.name) == stem(dll)))
}

/// The address an import resolves to, following forwarders.
fn resolve(loaded: &[LoadedImage], dll: &str, what: &ImportName) -> Option<u64> {
    let mut dll = dll.to_string();
    let mut what = what.clone();
    for _ in 0..=MAX_FORWARD_DEPTH {
        let m = find_module(loaded, &dll)?;
        let (rva, fwd) = match &what {
            ImportName::Name(n) => (m.exports.get(n).copied(), m.forwarders.get(n)),
            ImportName::Ordinal(o) => (m.ordinals.get(o).copied(), None),
        };
        if let Some(rva) = rva {
            return Some(m.base + u64::from(rva));
        }
        let (next_dll, next) = fwd?.split_once('.')?;
        what = match next.strip_prefix('#') {
            Some(o) => ImportName::Ordinal(o.parse().ok()?),
            None => ImportName::Name(next.to_string()),
        };
        dll = next_dll.to_string();
    }
    None
}

#[derive(Clone, Debug)]
enum ImportName {
    Name(String),
    Ordinal(u16),
}

impl std::fmt::Display for ImportName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImportName::Name(n) => f.write_str(n),
            ImportName::Ordinal(o) => write!(f, "#{o}"),
        }
    }
}

/// Walks the import descriptors; returns (IAT slot RVA, resolved address) pairs.
fn resolve_imports<Pe: ImageNtHeaders>(
    image: &[u8],
    import_rva: u32,
    loaded: &[LoadedImage],
    name: &str,
) -> Result<Vec<(u32, u64)>, LoadError> {
    let malformed = |detail: String| LoadError::Malformed {
        name: name.to_string(),
        detail,
    };
    let table = ImportTable::new(image, 0, import_rva);
    let mut descriptors = table.descriptors().map_err(|e| malformed(e.to_string()))?;
    let slot_size = std::mem::size_of::<Pe::ImageThunkData>() as u32;
    let mut out = Vec::new();
    while let Some(d) = descriptors.next().map_err(|e| malformed(e.to_string()))? {
        let dll = String::from_utf8_lossy(
            table
                .name(d.name.get(LE))
                .map_err(|e| malformed(e.to_string()))?,
        )
        .into_owned();
        let first_thunk = d.first_thunk.get(LE);
        let lookup = match d.original_first_thunk.get(LE) {
            0 => first_thunk,
            o => o,
        };
        let mut thunks = table.thunks(lookup).map_err(|e| malformed(e.to_string()))?;
        let mut i = 0u32;
        while let Some(thunk) = thunks.next::<Pe>().map_err(|e| malformed(e.to_string()))? {
            let what = match table
                .import::<Pe>(thunk)
                .map_err(|e| malformed(e.to_string()))?
            {
                Import::Name(_, n) => ImportName::Name(String::from_utf8_lossy(n).into_owned()),
                Import::Ordinal(o) => ImportName::Ordinal(o),
            };
            let address =
                resolve(loaded, &dll, &what).ok_or_else(|| LoadError::UnresolvedImport {
                    name: name.to_string(),
                    dll: dll.clone(),
                    import: what.to_string(),
                })?;
            let slot = first_thunk
                .checked_add(
                    i.checked_mul(slot_size)
                        .ok_or_else(|| malformed("too many imports".into()))?,
                )
                .ok_or_else(|| malformed("import address table overflows".into()))?;
            out.push((slot, address));
            i += 1;
        }
    }
    Ok(out)
}
