//! Identities of PDBs and images as symbol stores key them, and the sanitising of file names
//! that come from target memory before they become paths.

use std::fmt;

/// The longest file name accepted from the target (NTFS allows 255 UTF-16 units; real PDB and
/// driver names are far shorter).
pub const MAX_FILE_NAME_LEN: usize = 128;

/// A GUID as stored in a CodeView RSDS record (Data1..Data3 little-endian, Data4 as bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    fn fields(&self) -> (u32, u16, u16, [u8; 8]) {
        let b = &self.0;
        let d1 = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let d2 = u16::from_le_bytes([b[4], b[5]]);
        let d3 = u16::from_le_bytes([b[6], b[7]]);
        let mut d4 = [0u8; 8];
        d4.copy_from_slice(&b[8..16]);
        (d1, d2, d3, d4)
    }

    /// The 32 upper-case hex digits without dashes, as a symbol store key starts.
    pub fn to_store_hex(&self) -> String {
        let (d1, d2, d3, d4) = self.fields();
        let mut s = format!("{d1:08X}{d2:04X}{d3:04X}");
        for b in d4 {
            s.push_str(&format!("{b:02X}"));
        }
        s
    }

    /// Builds a GUID from its fields (the order `uuid::Uuid::as_fields` gives them).
    pub fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Self {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&d1.to_le_bytes());
        b[4..6].copy_from_slice(&d2.to_le_bytes());
        b[6..8].copy_from_slice(&d3.to_le_bytes());
        b[8..16].copy_from_slice(&d4);
        Guid(b)
    }
}

impl fmt::Display for Guid {
    /// `{6317138C-97CE-3F56-4C4C-44205044422E}`, the registry form WinDbg prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (d1, d2, d3, d4) = self.fields();
        write!(
            f,
            "{{{d1:08X}-{d2:04X}-{d3:04X}-{:02X}{:02X}-",
            d4[0], d4[1]
        )?;
        for b in &d4[2..] {
            write!(f, "{b:02X}")?;
        }
        f.write_str("}")
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What identifies a PDB: a GUID (RSDS, PDB 7.0) or a timestamp signature (NB10, PDB 2.0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PdbSignature {
    /// RSDS: a GUID.
    Guid(Guid),
    /// NB10: a 32-bit timestamp.
    Timestamp(u32),
}

impl fmt::Display for PdbSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PdbSignature::Guid(g) => write!(f, "{g}"),
            PdbSignature::Timestamp(t) => write!(f, "{t:08X}"),
        }
    }
}

/// A PDB as a symbol store knows it: `name.pdb/<key>/name.pdb`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PdbId {
    /// The sanitised file name (`ntkrnlmp.pdb`): a single path component.
    pub name: String,
    /// GUID or NB10 signature.
    pub signature: PdbSignature,
    /// The age the image expects.
    pub age: u32,
}

impl PdbId {
    /// The store directory key: GUID as 32 upper-case hex digits (or the NB10 signature as 8),
    /// then the age in lower-case hex without leading zeros.
    pub fn store_key(&self) -> String {
        match self.signature {
            PdbSignature::Guid(g) => format!("{}{:x}", g.to_store_hex(), self.age),
            PdbSignature::Timestamp(t) => format!("{t:08X}{:x}", self.age),
        }
    }
}

impl fmt::Display for PdbId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} age {}", self.name, self.signature, self.age)
    }
}

/// An image file as a symbol store knows it: `name.exe/<TIMESTAMP><SizeOfImage>/name.exe`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageId {
    /// The sanitised file name (`ntoskrnl.exe`).
    pub name: String,
    /// IMAGE_FILE_HEADER.TimeDateStamp.
    pub time_date_stamp: u32,
    /// IMAGE_OPTIONAL_HEADER.SizeOfImage.
    pub size_of_image: u32,
}

impl ImageId {
    /// The store directory key: `%08X` timestamp then `%x` size.
    pub fn store_key(&self) -> String {
        format!("{:08X}{:x}", self.time_date_stamp, self.size_of_image)
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.name, self.store_key())
    }
}

/// Why a file name from the target was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("refusing file name {shown:?} from the target: {reason}")]
pub struct FileNameError {
    /// The offending name, escaped and cut for display.
    pub shown: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Turns a file name or path that came from target memory (a CodeView PDB path, a
/// BaseDllName) into one safe path component for a symbol store.
///
/// The last component after `\` or `/` is kept (a build machine's `d:\os\...\ntkrnlmp.pdb`
/// becomes `ntkrnlmp.pdb`, as dbghelp does). The result is refused when it is empty, `.` or
/// `..`, longer than [`MAX_FILE_NAME_LEN`] bytes, or contains a NUL, a control character, a
/// drive or stream colon, or any of `*?"<>|`.
pub fn sanitize_file_name(raw: &str) -> Result<String, FileNameError> {
    let err = |reason| FileNameError {
        shown: raw.chars().take(80).flat_map(char::escape_debug).collect(),
        reason,
    };
    if raw.contains('\0') {
        return Err(err("it contains a NUL"));
    }
    let base = raw.rsplit(['\\', '/']).next().unwrap_or(raw).trim_end();
    if base.is_empty() {
        return Err(err("it has no file name"));
    }
    if base == "." || base == ".." || base.chars().all(|c| c == '.') {
        return Err(err("it names a directory"));
    }
    if base.len() > MAX_FILE_NAME_LEN {
        return Err(err("it is too long"));
    }
    if base.chars().any(|c| c.is_control()) {
        return Err(err("it contains a control character"));
    }
    if base.contains(':') {
        return Err(err("it contains a drive or stream colon"));
    }
    if base
        .chars()
        .any(|c| matches!(c, '*' | '?' | '"' | '<' | '>' | '|'))
    {
        return Err(err("it contains a wildcard or reserved character"));
    }
    if base.starts_with(' ') || base.ends_with('.') {
        return Err(err("it starts with a space or ends with a dot"));
    }
    if is_windows_device(base) {
        return Err(err("it is a Windows device name"));
    }
    Ok(base.to_string())
}

/// `CON`, `NUL`, `COM1`, `lpt9.pdb`...: on a Windows host such a name opens a device, with any
/// extension, whatever the directory.
fn is_windows_device(name: &str) -> bool {
    let stem = name.split('.').next().unwrap_or(name).trim_end();
    let upper = stem.to_ascii_uppercase();
    match upper.as_bytes() {
        b"CON" | b"PRN" | b"AUX" | b"NUL" => true,
        [b'C', b'O', b'M', d] | [b'L', b'P', b'T', d] => d.is_ascii_digit(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_device_names_are_refused() {
        for bad in ["NUL.pdb", "con", "Aux.sys", "com1.pdb", "LPT9", "nul .pdb"] {
            assert!(sanitize_file_name(bad).is_err(), "{bad}");
        }
        for good in [
            "console.pdb",
            "nullptr.pdb",
            "com10.pdb",
            "ntkrnlmp.pdb",
            "lpt.pdb",
        ] {
            assert_eq!(sanitize_file_name(good).as_deref(), Ok(good), "{good}");
        }
    }

    #[test]
    fn store_keys() {
        let g = Guid::from_fields(
            0x6317138C,
            0x97CE,
            0x3F56,
            [0x4C, 0x4C, 0x44, 0x20, 0x50, 0x44, 0x42, 0x2E],
        );
        let id = PdbId {
            name: "ntoskrnl.pdb".into(),
            signature: PdbSignature::Guid(g),
            age: 1,
        };
        assert_eq!(id.store_key(), "6317138C97CE3F564C4C44205044422E1");
        assert_eq!(g.to_string(), "{6317138C-97CE-3F56-4C4C-44205044422E}");
        let id = PdbId { age: 0x1a, ..id };
        assert!(id.store_key().ends_with("2E1a"));
        let img = ImageId {
            name: "ntoskrnl.exe".into(),
            time_date_stamp: 0x3B6DCB75,
            size_of_image: 0x15000,
        };
        assert_eq!(img.store_key(), "3B6DCB7515000");
        let img = ImageId {
            time_date_stamp: 0xAB,
            ..img
        };
        assert_eq!(img.store_key(), "000000AB15000");
    }

    #[test]
    fn hostile_names_are_contained_or_refused() {
        assert_eq!(
            sanitize_file_name(r"d:\os\obj\amd64fre\ntkrnlmp.pdb").unwrap(),
            "ntkrnlmp.pdb"
        );
        assert_eq!(
            sanitize_file_name("../../../../etc/passwd").unwrap(),
            "passwd"
        );
        assert_eq!(sanitize_file_name(r"..\..\evil.pdb").unwrap(), "evil.pdb");
        assert_eq!(sanitize_file_name("/abs/x.pdb").unwrap(), "x.pdb");
        for bad in [
            "",
            "..",
            ".",
            "a/..",
            "dir/",
            "C:evil.pdb",
            "c:",
            "x.pdb\0.txt",
            "a\u{1}b.pdb",
            "file.pdb:stream",
            "*.pdb",
            "a?.pdb",
            "x.pdb.",
            " x.pdb",
            "...",
        ] {
            assert!(sanitize_file_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(sanitize_file_name(&"a".repeat(MAX_FILE_NAME_LEN + 1)).is_err());
        assert!(sanitize_file_name(&"a".repeat(MAX_FILE_NAME_LEN)).is_ok());
        let e = sanitize_file_name("bad\0name").unwrap_err();
        assert!(e.to_string().contains("\\0"), "{e}");
    }
}
