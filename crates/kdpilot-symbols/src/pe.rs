//! PE headers, from target memory (bounded reads) or from a local file, and what kdpilot needs
//! from them: sections, the CodeView record, exports, and RVA access for unwind data.

use std::sync::Arc;

use crate::bytes::{c_string, le_u16, le_u32, le_u64, slice};
use crate::ids::{sanitize_file_name, FileNameError, Guid, ImageId, PdbId, PdbSignature};
use crate::memory::{MemoryReader, MemoryReaderExt, ReadError};

/// The most header bytes read from the target (e_lfanew, the NT headers and the section table
/// must lie within).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The most sections accepted (the Windows loader's own limit).
pub const MAX_SECTIONS: usize = 96;
/// The largest SizeOfImage accepted.
pub const MAX_IMAGE_SIZE: u32 = 1 << 30;
/// The most debug directory entries looked at.
pub const MAX_DEBUG_ENTRIES: usize = 32;
/// The most bytes of a CodeView record read.
pub const MAX_CODEVIEW_BYTES: usize = 1024;
/// The most exports parsed.
pub const MAX_EXPORTS: usize = 1 << 16;

/// IMAGE_DIRECTORY_ENTRY_EXPORT.
pub const DIR_EXPORT: usize = 0;
/// IMAGE_DIRECTORY_ENTRY_EXCEPTION (.pdata).
pub const DIR_EXCEPTION: usize = 3;
/// IMAGE_DIRECTORY_ENTRY_DEBUG.
pub const DIR_DEBUG: usize = 6;

/// IMAGE_SCN_MEM_EXECUTE.
pub const SCN_MEM_EXECUTE: u32 = 0x2000_0000;
/// IMAGE_SCN_MEM_WRITE.
pub const SCN_MEM_WRITE: u32 = 0x8000_0000;
/// IMAGE_SCN_MEM_DISCARDABLE.
pub const SCN_MEM_DISCARDABLE: u32 = 0x0200_0000;
/// IMAGE_SCN_CNT_CODE.
pub const SCN_CNT_CODE: u32 = 0x20;

/// Why PE headers were not accepted.
#[derive(Debug, thiserror::Error)]
pub enum PeError {
    /// The bytes are not a PE image, or a field is out of its sane range.
    #[error("not a valid PE image: {0}")]
    Invalid(&'static str),
    /// More bytes are needed than were given (the headers are longer).
    #[error("PE headers need {needed} bytes, {have} available")]
    Truncated {
        /// Bytes needed from the start of the image.
        needed: usize,
        /// Bytes that were available.
        have: usize,
    },
    /// Target memory could not be read.
    #[error(transparent)]
    Read(#[from] ReadError),
}

/// One IMAGE_DATA_DIRECTORY.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataDirectory {
    /// RVA of the data.
    pub rva: u32,
    /// Size in bytes.
    pub size: u32,
}

/// One section header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// The name, up to 8 bytes (lossy UTF-8).
    pub name: String,
    /// VirtualSize.
    pub virtual_size: u32,
    /// VirtualAddress (RVA).
    pub virtual_address: u32,
    /// SizeOfRawData.
    pub raw_size: u32,
    /// PointerToRawData.
    pub raw_offset: u32,
    /// Characteristics (IMAGE_SCN_*).
    pub characteristics: u32,
}

impl Section {
    /// The size the section occupies in memory.
    pub fn memory_size(&self) -> u32 {
        if self.virtual_size == 0 {
            self.raw_size
        } else {
            self.virtual_size
        }
    }

    /// Whether `rva` is inside the section in memory.
    pub fn contains(&self, rva: u32) -> bool {
        rva >= self.virtual_address
            && u64::from(rva) < u64::from(self.virtual_address) + u64::from(self.memory_size())
    }

    /// Whether the section holds code.
    pub fn is_executable(&self) -> bool {
        self.characteristics & (SCN_MEM_EXECUTE | SCN_CNT_CODE) != 0
    }
}

/// The parts of the PE headers kdpilot uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeHeaders {
    /// IMAGE_FILE_HEADER.Machine.
    pub machine: u16,
    /// IMAGE_FILE_HEADER.TimeDateStamp.
    pub time_date_stamp: u32,
    /// PE32+ (64-bit) optional header.
    pub is_pe32_plus: bool,
    /// ImageBase (the preferred base).
    pub image_base: u64,
    /// AddressOfEntryPoint.
    pub entry_point: u32,
    /// SizeOfImage.
    pub size_of_image: u32,
    /// SizeOfHeaders.
    pub size_of_headers: u32,
    /// CheckSum.
    pub checksum: u32,
    /// Data directories (at most 16).
    pub data_directories: Vec<DataDirectory>,
    /// Section headers (at most [`MAX_SECTIONS`]).
    pub sections: Vec<Section>,
}

impl PeHeaders {
    /// Parses headers from the first bytes of an image (in memory or a file; the header layout
    /// is the same). Fails with [`PeError::Truncated`] when the headers run past `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, PeError> {
        let need = |needed: usize| PeError::Truncated {
            needed,
            have: bytes.len(),
        };
        if bytes.len() < 0x40 {
            return Err(need(0x40));
        }
        if bytes.get(0..2) != Some(b"MZ") {
            return Err(PeError::Invalid("no MZ signature"));
        }
        let e_lfanew = le_u32(bytes, 0x3C).ok_or(need(0x40))? as usize;
        if !(0x40..=MAX_HEADER_BYTES - 0x200).contains(&e_lfanew) || e_lfanew % 4 != 0 {
            return Err(PeError::Invalid("e_lfanew out of range"));
        }
        let fh = e_lfanew + 4;
        let opt = fh + 20;
        if bytes.len() < opt {
            return Err(need(opt + 0xF0));
        }
        if bytes.get(e_lfanew..fh) != Some(b"PE\0\0") {
            return Err(PeError::Invalid("no PE signature"));
        }
        let machine = le_u16(bytes, fh).ok_or(need(opt))?;
        let nsections = le_u16(bytes, fh + 2).ok_or(need(opt))? as usize;
        let time_date_stamp = le_u32(bytes, fh + 4).ok_or(need(opt))?;
        let opt_size = le_u16(bytes, fh + 16).ok_or(need(opt))? as usize;
        if nsections > MAX_SECTIONS {
            return Err(PeError::Invalid("too many sections"));
        }
        let sect_table = opt + opt_size;
        let end = sect_table + nsections * 40;
        if end > MAX_HEADER_BYTES {
            return Err(PeError::Invalid("headers too long"));
        }
        if bytes.len() < end {
            return Err(need(end));
        }
        let magic = le_u16(bytes, opt).ok_or(PeError::Invalid("no optional header"))?;
        let is_pe32_plus = match magic {
            0x10B => false,
            0x20B => true,
            _ => return Err(PeError::Invalid("unknown optional header magic")),
        };
        let field = |off: usize| -> Result<u32, PeError> {
            if off + 4 > opt_size {
                return Err(PeError::Invalid("optional header too short"));
            }
            le_u32(bytes, opt + off).ok_or(PeError::Invalid("optional header too short"))
        };
        let entry_point = field(16)?;
        let image_base = if is_pe32_plus {
            if 32 > opt_size {
                return Err(PeError::Invalid("optional header too short"));
            }
            le_u64(bytes, opt + 24).ok_or(PeError::Invalid("optional header too short"))?
        } else {
            u64::from(field(28)?)
        };
        let size_of_image = field(56)?;
        let size_of_headers = field(60)?;
        let checksum = field(64)?;
        if size_of_image == 0 || size_of_image > MAX_IMAGE_SIZE {
            return Err(PeError::Invalid("SizeOfImage out of range"));
        }
        let (ndirs_off, dirs_off) = if is_pe32_plus { (108, 112) } else { (92, 96) };
        let ndirs = (field(ndirs_off)? as usize).min(16);
        let mut data_directories = Vec::with_capacity(ndirs);
        for i in 0..ndirs {
            let off = dirs_off + i * 8;
            if off + 8 > opt_size {
                break;
            }
            data_directories.push(DataDirectory {
                rva: field(off)?,
                size: field(off + 4)?,
            });
        }
        let mut sections = Vec::with_capacity(nsections);
        for i in 0..nsections {
            let s = sect_table + i * 40;
            let h = slice(bytes, s, 40).ok_or(need(end))?;
            let raw_name = &h[..8];
            let name_len = raw_name.iter().position(|&c| c == 0).unwrap_or(8);
            sections.push(Section {
                name: String::from_utf8_lossy(&raw_name[..name_len]).into_owned(),
                virtual_size: le_u32(h, 8).unwrap_or(0),
                virtual_address: le_u32(h, 12).unwrap_or(0),
                raw_size: le_u32(h, 16).unwrap_or(0),
                raw_offset: le_u32(h, 20).unwrap_or(0),
                characteristics: le_u32(h, 36).unwrap_or(0),
            });
        }
        Ok(PeHeaders {
            machine,
            time_date_stamp,
            is_pe32_plus,
            image_base,
            entry_point,
            size_of_image,
            size_of_headers,
            checksum,
            data_directories,
            sections,
        })
    }

    /// Data directory `index`, if present and non-empty.
    pub fn directory(&self, index: usize) -> Option<DataDirectory> {
        self.data_directories
            .get(index)
            .copied()
            .filter(|d| d.rva != 0 && d.size != 0)
    }

    /// The section containing `rva`.
    pub fn section_of(&self, rva: u32) -> Option<&Section> {
        self.sections.iter().find(|s| s.contains(rva))
    }

    /// Whether `rva` is in an executable section.
    pub fn is_executable_rva(&self, rva: u32) -> bool {
        self.section_of(rva).is_some_and(Section::is_executable)
    }

    /// The file offset of `rva` in a file laid out by these headers.
    pub fn rva_to_file_offset(&self, rva: u32) -> Option<usize> {
        if rva < self.size_of_headers {
            return Some(rva as usize);
        }
        let s = self.section_of(rva)?;
        let within = rva - s.virtual_address;
        (within < s.raw_size).then(|| s.raw_offset as usize + within as usize)
    }

    /// Ranges of the mapped image (relative to its base) that do not change while it is
    /// loaded: the headers and the sections that are neither writable nor discardable.
    pub fn stable_rva_ranges(&self) -> Vec<(u32, u32)> {
        let mut out = vec![(0, self.size_of_headers.min(self.size_of_image))];
        for s in &self.sections {
            if s.characteristics & (SCN_MEM_WRITE | SCN_MEM_DISCARDABLE) == 0 {
                out.push((s.virtual_address, s.memory_size()));
            }
        }
        out
    }

    /// The image's identity in a symbol store, under `file_name` (sanitised here).
    pub fn image_id(&self, file_name: &str) -> Result<ImageId, FileNameError> {
        Ok(ImageId {
            name: sanitize_file_name(file_name)?,
            time_date_stamp: self.time_date_stamp,
            size_of_image: self.size_of_image,
        })
    }
}

/// The CodeView record of the debug directory: which PDB the image was linked with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeViewInfo {
    /// GUID (RSDS) or signature (NB10).
    pub signature: PdbSignature,
    /// Age.
    pub age: u32,
    /// The PDB path exactly as recorded (lossy UTF-8): untrusted, for display only.
    pub pdb_path: String,
}

impl CodeViewInfo {
    /// Parses an RSDS or NB10 record.
    pub fn parse(data: &[u8]) -> Option<Self> {
        let max_name = MAX_CODEVIEW_BYTES;
        match data.get(0..4)? {
            b"RSDS" => {
                let mut g = [0u8; 16];
                g.copy_from_slice(slice(data, 4, 16)?);
                let age = le_u32(data, 20)?;
                let name = c_string(data, 24, max_name)
                    .or_else(|| data.get(24..))
                    .unwrap_or_default();
                Some(CodeViewInfo {
                    signature: PdbSignature::Guid(Guid(g)),
                    age,
                    pdb_path: String::from_utf8_lossy(name).into_owned(),
                })
            }
            b"NB10" => {
                let sig = le_u32(data, 8)?;
                let age = le_u32(data, 12)?;
                let name = c_string(data, 16, max_name)
                    .or_else(|| data.get(16..))
                    .unwrap_or_default();
                Some(CodeViewInfo {
                    signature: PdbSignature::Timestamp(sig),
                    age,
                    pdb_path: String::from_utf8_lossy(name).into_owned(),
                })
            }
            _ => None,
        }
    }

    /// The PDB's identity in a symbol store; the recorded path is sanitised to a file name.
    pub fn pdb_id(&self) -> Result<PdbId, FileNameError> {
        Ok(PdbId {
            name: sanitize_file_name(&self.pdb_path)?,
            signature: self.signature,
            age: self.age,
        })
    }
}

/// Finds the CodeView entry among raw debug directory entries: (rva, file offset, size).
fn codeview_entries(dir: &[u8]) -> impl Iterator<Item = (u32, u32, u32)> + '_ {
    dir.chunks_exact(28)
        .take(MAX_DEBUG_ENTRIES)
        .filter(|e| le_u32(e, 12) == Some(2))
        .filter_map(|e| Some((le_u32(e, 20)?, le_u32(e, 24)?, le_u32(e, 16)?)))
}

/// Bytes of headers read first: enough for the DOS stub, the NT headers and about 20 sections.
pub const FIRST_HEADER_READ: usize = 0x400;

/// Reads and parses PE headers of the image mapped at `base` in target memory. Reads
/// [`FIRST_HEADER_READ`] bytes, and more (up to [`MAX_HEADER_BYTES`]) only when the section
/// table runs past them.
pub async fn read_headers<R: MemoryReader>(
    reader: &mut R,
    base: u64,
) -> Result<PeHeaders, PeError> {
    let first = reader.read(base, FIRST_HEADER_READ).await?;
    if first.is_empty() {
        return Err(ReadError::Unreadable { address: base }.into());
    }
    match PeHeaders::parse(&first) {
        Err(PeError::Truncated { needed, .. })
            if needed <= MAX_HEADER_BYTES && needed > first.len() =>
        {
            let more = reader.read_exact(base, needed).await?;
            PeHeaders::parse(&more)
        }
        other => other,
    }
}

/// Reads the CodeView record of the image at `base` through its debug directory. `Ok(None)`
/// when the image has none.
pub async fn read_codeview<R: MemoryReader>(
    reader: &mut R,
    base: u64,
    headers: &PeHeaders,
) -> Result<Option<CodeViewInfo>, PeError> {
    let Some(dir) = headers.directory(DIR_DEBUG) else {
        return Ok(None);
    };
    if dir.rva >= headers.size_of_image {
        return Err(PeError::Invalid("debug directory outside the image"));
    }
    let len = (dir.size as usize).min(MAX_DEBUG_ENTRIES * 28);
    let entries = reader
        .read_exact(base.wrapping_add(u64::from(dir.rva)), len)
        .await?;
    for (rva, _, size) in codeview_entries(&entries).collect::<Vec<_>>() {
        if rva == 0 || rva >= headers.size_of_image {
            continue;
        }
        let n = (size as usize).clamp(24, MAX_CODEVIEW_BYTES);
        let data = reader.read(base.wrapping_add(u64::from(rva)), n).await?;
        if let Some(cv) = CodeViewInfo::parse(&data) {
            return Ok(Some(cv));
        }
    }
    Ok(None)
}

/// One exported function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    /// The exported name (`None` for exports by ordinal only).
    pub name: Option<String>,
    /// The ordinal.
    pub ordinal: u32,
    /// RVA of the function.
    pub rva: u32,
}

/// Parses an export directory given the bytes of its whole data directory range, which starts
/// at `dir_rva`. Names and tables outside that range are ignored (they are inside it in every
/// image linkers produce). Forwarders are skipped.
pub fn parse_exports(dir_rva: u32, dir: &[u8]) -> Vec<Export> {
    let at = |rva: u32| -> Option<usize> {
        let off = rva.checked_sub(dir_rva)? as usize;
        (off < dir.len()).then_some(off)
    };
    let (Some(base), Some(nfuncs), Some(nnames), Some(eat), Some(enpt), Some(eot)) = (
        le_u32(dir, 16),
        le_u32(dir, 20),
        le_u32(dir, 24),
        le_u32(dir, 28),
        le_u32(dir, 32),
        le_u32(dir, 36),
    ) else {
        return Vec::new();
    };
    let nfuncs = (nfuncs as usize).min(MAX_EXPORTS);
    let nnames = (nnames as usize).min(MAX_EXPORTS);
    let dir_end = u64::from(dir_rva) + dir.len() as u64;
    let is_forwarder = |rva: u32| u64::from(rva) >= u64::from(dir_rva) && u64::from(rva) < dir_end;
    let func_rva = |i: usize| -> Option<u32> { le_u32(dir, at(eat)?.checked_add(i * 4)?) };
    let mut names: Vec<Option<String>> = vec![None; nfuncs];
    if let (Some(enpt_off), Some(eot_off)) = (at(enpt), at(eot)) {
        for i in 0..nnames {
            let (Some(name_rva), Some(ord)) =
                (le_u32(dir, enpt_off + i * 4), le_u16(dir, eot_off + i * 2))
            else {
                break;
            };
            let Some(name_off) = at(name_rva) else {
                continue;
            };
            let Some(name) = c_string(dir, name_off, 512) else {
                continue;
            };
            if let Some(slot) = names.get_mut(ord as usize) {
                *slot = Some(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    let mut out = Vec::new();
    for (i, name) in names.into_iter().enumerate() {
        let Some(rva) = func_rva(i) else { break };
        if rva == 0 || is_forwarder(rva) {
            continue;
        }
        out.push(Export {
            name,
            ordinal: base.wrapping_add(i as u32),
            rva,
        });
    }
    out
}

/// Reads the export table of the image at `base` from target memory, if the export directory is
/// at most `budget` bytes (an ntoskrnl export directory is >100 KiB: about a minute at
/// 1,920 bytes/s, so callers choose).
pub async fn read_exports<R: MemoryReader>(
    reader: &mut R,
    base: u64,
    headers: &PeHeaders,
    budget: usize,
) -> Result<Vec<Export>, PeError> {
    let Some(dir) = headers.directory(DIR_EXPORT) else {
        return Ok(Vec::new());
    };
    if dir.size as usize > budget || dir.rva >= headers.size_of_image {
        return Err(PeError::Invalid(
            "export directory too large or outside the image",
        ));
    }
    let bytes = reader
        .read(base.wrapping_add(u64::from(dir.rva)), dir.size as usize)
        .await?;
    Ok(parse_exports(dir.rva, &bytes))
}

/// An image file from disk or a symbol store: its bytes and parsed headers.
#[derive(Clone, Debug)]
pub struct PeFile {
    bytes: Arc<[u8]>,
    headers: PeHeaders,
}

impl PeFile {
    /// Parses `bytes` as an image file.
    pub fn parse(bytes: impl Into<Arc<[u8]>>) -> Result<Self, PeError> {
        let bytes: Arc<[u8]> = bytes.into();
        let headers = PeHeaders::parse(&bytes[..bytes.len().min(MAX_HEADER_BYTES)])?;
        Ok(PeFile { bytes, headers })
    }

    /// The headers.
    pub fn headers(&self) -> &PeHeaders {
        &self.headers
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The bytes at `rva` up to the end of its section's raw data (or of the headers).
    pub fn at_rva(&self, rva: u32) -> Option<&[u8]> {
        let off = self.headers.rva_to_file_offset(rva)?;
        let end = if rva < self.headers.size_of_headers {
            self.headers.size_of_headers as usize
        } else {
            let s = self.headers.section_of(rva)?;
            s.raw_offset as usize + s.raw_size as usize
        };
        self.bytes.get(off..end.min(self.bytes.len()))
    }

    /// `len` bytes at `rva`, if they are all in the file.
    pub fn read_rva(&self, rva: u32, len: usize) -> Option<&[u8]> {
        self.at_rva(rva)?.get(..len)
    }

    /// The CodeView record.
    pub fn codeview(&self) -> Option<CodeViewInfo> {
        let dir = self.headers.directory(DIR_DEBUG)?;
        let entries = self.at_rva(dir.rva)?;
        let entries = &entries[..entries.len().min(dir.size as usize)];
        codeview_entries(entries).find_map(|(_, file_off, size)| {
            let n = (size as usize).min(MAX_CODEVIEW_BYTES);
            CodeViewInfo::parse(
                slice(&self.bytes, file_off as usize, n)
                    .or_else(|| self.bytes.get(file_off as usize..))?,
            )
        })
    }

    /// The export table.
    pub fn exports(&self) -> Vec<Export> {
        let Some(dir) = self.headers.directory(DIR_EXPORT) else {
            return Vec::new();
        };
        match self.at_rva(dir.rva) {
            Some(b) => parse_exports(dir.rva, &b[..b.len().min(dir.size as usize)]),
            None => Vec::new(),
        }
    }

    /// The raw `.pdata` (exception directory) bytes.
    pub fn exception_directory(&self) -> Option<&[u8]> {
        let dir = self.headers.directory(DIR_EXCEPTION)?;
        self.read_rva(dir.rva, dir.size as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused_without_panicking() {
        assert!(PeHeaders::parse(&[]).is_err());
        assert!(PeHeaders::parse(&[0u8; 0x1000]).is_err());
        let mut b = vec![0u8; 0x400];
        b[0] = b'M';
        b[1] = b'Z';
        b[0x3C] = 0xFF;
        b[0x3D] = 0xFF;
        assert!(matches!(PeHeaders::parse(&b), Err(PeError::Invalid(_))));
        b[0x3C] = 0x80;
        b[0x3D] = 0;
        b[0x80..0x84].copy_from_slice(b"PE\0\0");
        assert!(PeHeaders::parse(&b).is_err());
        assert!(CodeViewInfo::parse(b"RSDS").is_none());
        assert!(parse_exports(0x1000, &[0xFF; 39]).is_empty());
    }

    #[test]
    fn rsds_names_are_bounded() {
        let mut rec = b"RSDS".to_vec();
        rec.extend_from_slice(&[0x11; 16]);
        rec.extend_from_slice(&7u32.to_le_bytes());
        rec.extend_from_slice(b"..\\..\\x.pdb\0trailing");
        let cv = CodeViewInfo::parse(&rec).unwrap();
        assert_eq!(cv.age, 7);
        assert_eq!(cv.pdb_path, "..\\..\\x.pdb");
        assert_eq!(cv.pdb_id().unwrap().name, "x.pdb");
        // No terminator: the rest of the (bounded) record is the name.
        let mut rec2 = rec[..24].to_vec();
        rec2.extend_from_slice(b"abc.pdb");
        assert_eq!(CodeViewInfo::parse(&rec2).unwrap().pdb_path, "abc.pdb");
    }
}
