//! DBGKD_FILE_IO (kd-protocol.md 2.5): the target asks the host for replacement driver files
//! (.kdfiles). 64-byte structure, then the UTF-16 file name (CreateFile) or file data
//! (WriteFile requests, ReadFile replies).
//!
//! A host that serves no files answers every request like WinDbg does:
//! [`FileIo::reply_no_such_file`] (T1 frames 236 -> 238).

use crate::wire::bytes::{Fields, FieldsMut};
use crate::wire::status;
use crate::PayloadError;

/// Size of DBGKD_FILE_IO.
pub const FILE_IO_SIZE: usize = 64;
/// Size of the union at offset 8.
pub const FILE_IO_UNION_SIZE: usize = 56;

/// FILE_IO ApiNumber values.
pub mod api_number {
    /// DbgKdCreateFileApi.
    pub const CREATE_FILE: u32 = 0x3430;
    /// DbgKdReadFileApi.
    pub const READ_FILE: u32 = 0x3431;
    /// DbgKdWriteFileApi.
    pub const WRITE_FILE: u32 = 0x3432;
    /// DbgKdCloseFileApi.
    pub const CLOSE_FILE: u32 = 0x3433;
}

/// A KD_FILE_IO payload, generic form: every byte kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileIo {
    /// ApiNumber @0.
    pub api: u32,
    /// Status @4 (0 in requests, NTSTATUS in replies).
    pub status: u32,
    /// The 56-byte union @8 (real kernels leave stack junk in unused bytes: T1 frame 236).
    pub body: [u8; FILE_IO_UNION_SIZE],
    /// Bytes after the structure (file name, or file data).
    pub data: Vec<u8>,
}

/// DBGKD_CREATE_FILE: open a file on the host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreateFile {
    /// Status @4.
    pub status: u32,
    /// DesiredAccess @8.
    pub desired_access: u32,
    /// FileAttributes @12.
    pub file_attributes: u32,
    /// ShareAccess @16.
    pub share_access: u32,
    /// CreateDisposition @20.
    pub create_disposition: u32,
    /// CreateOptions @24.
    pub create_options: u32,
    /// Handle @32 (returned by the host).
    pub handle: u64,
    /// Length @40 (file size, returned by the host).
    pub length: u64,
    /// The file name as sent: UTF-16LE bytes, normally NUL-terminated.
    pub name: Vec<u8>,
}

/// DBGKD_READ_FILE / DBGKD_WRITE_FILE.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileTransfer {
    /// Status @4.
    pub status: u32,
    /// Handle @8.
    pub handle: u64,
    /// Offset @16.
    pub offset: u64,
    /// Length @24.
    pub length: u32,
    /// The data (WriteFile request, ReadFile reply).
    pub data: Vec<u8>,
}

/// DBGKD_CLOSE_FILE.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CloseFile {
    /// Status @4.
    pub status: u32,
    /// Handle @8.
    pub handle: u64,
}

/// A FILE_IO message, decoded by ApiNumber.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileIoOp {
    /// 0x3430.
    Create(CreateFile),
    /// 0x3431.
    Read(FileTransfer),
    /// 0x3432.
    Write(FileTransfer),
    /// 0x3433.
    Close(CloseFile),
}

impl FileIo {
    /// Parses a KD_FILE_IO payload (at least 64 bytes).
    pub fn parse(payload: &[u8]) -> Result<Self, PayloadError> {
        let f = Fields::new(payload, "DBGKD_FILE_IO");
        f.slice(0, FILE_IO_SIZE)?;
        Ok(Self {
            api: f.u32(0)?,
            status: f.u32(4)?,
            body: f.bytes_at(8)?,
            data: f.rest(FILE_IO_SIZE).to_vec(),
        })
    }

    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; FILE_IO_SIZE];
        let mut w = FieldsMut::new(&mut out);
        w.u32(0, self.api);
        w.u32(4, self.status);
        w.put(8, &self.body);
        out.extend_from_slice(&self.data);
        out
    }

    /// The reply WinDbg sends to any request it cannot serve: the 64-byte structure echoed,
    /// Status STATUS_NO_SUCH_FILE, no data.
    pub fn reply_no_such_file(&self) -> FileIo {
        self.reply_status(status::NO_SUCH_FILE)
    }

    /// The structure echoed with `status`, no data.
    pub fn reply_status(&self, status: u32) -> FileIo {
        FileIo {
            api: self.api,
            status,
            body: self.body,
            data: Vec::new(),
        }
    }

    fn body(&self) -> Fields<'_> {
        Fields::new(&self.body, "DBGKD_FILE_IO union")
    }

    /// For CreateFile: the file name, decoded from UTF-16LE up to the first NUL (lossy).
    pub fn file_name(&self) -> Option<String> {
        (self.api == api_number::CREATE_FILE).then(|| utf16_lossy(&self.data))
    }

    /// Decodes by ApiNumber. Fails for an unknown ApiNumber.
    pub fn op(&self) -> Result<FileIoOp, PayloadError> {
        let b = self.body();
        // Offsets below are relative to the union (packet offset - 8).
        Ok(match self.api {
            api_number::CREATE_FILE => FileIoOp::Create(CreateFile {
                status: self.status,
                desired_access: b.u32(0)?,
                file_attributes: b.u32(4)?,
                share_access: b.u32(8)?,
                create_disposition: b.u32(12)?,
                create_options: b.u32(16)?,
                handle: b.u64(24)?,
                length: b.u64(32)?,
                name: self.data.clone(),
            }),
            api_number::READ_FILE | api_number::WRITE_FILE => {
                let t = FileTransfer {
                    status: self.status,
                    handle: b.u64(0)?,
                    offset: b.u64(8)?,
                    length: b.u32(16)?,
                    data: self.data.clone(),
                };
                if self.api == api_number::READ_FILE {
                    FileIoOp::Read(t)
                } else {
                    FileIoOp::Write(t)
                }
            }
            api_number::CLOSE_FILE => FileIoOp::Close(CloseFile {
                status: self.status,
                handle: b.u64(0)?,
            }),
            other => {
                return Err(PayloadError::Invalid {
                    what: "DBGKD_FILE_IO",
                    detail: format!("unknown ApiNumber {other:#06x}"),
                })
            }
        })
    }
}

impl FileIoOp {
    /// The generic form (unused union bytes zero).
    pub fn to_file_io(&self) -> FileIo {
        let mut body = [0u8; FILE_IO_UNION_SIZE];
        let mut w = FieldsMut::new(&mut body);
        let (api, status, data) = match self {
            FileIoOp::Create(c) => {
                w.u32(0, c.desired_access);
                w.u32(4, c.file_attributes);
                w.u32(8, c.share_access);
                w.u32(12, c.create_disposition);
                w.u32(16, c.create_options);
                w.u64(24, c.handle);
                w.u64(32, c.length);
                (api_number::CREATE_FILE, c.status, c.name.clone())
            }
            FileIoOp::Read(t) | FileIoOp::Write(t) => {
                w.u64(0, t.handle);
                w.u64(8, t.offset);
                w.u32(16, t.length);
                let api = if matches!(self, FileIoOp::Read(_)) {
                    api_number::READ_FILE
                } else {
                    api_number::WRITE_FILE
                };
                (api, t.status, t.data.clone())
            }
            FileIoOp::Close(c) => {
                w.u64(0, c.handle);
                (api_number::CLOSE_FILE, c.status, Vec::new())
            }
        };
        FileIo {
            api,
            status,
            body,
            data,
        }
    }
}

impl CreateFile {
    /// A CreateFile request for `name` (UTF-16LE, NUL-terminated), with the access bits a
    /// Windows kernel uses to fetch a driver (T1 frame 236: GENERIC_READ|SYNCHRONIZE-style
    /// 0x120089, FILE_ATTRIBUTE_NORMAL, FILE_SHARE_READ, FILE_OPEN).
    pub fn open(name: &str) -> Self {
        Self {
            status: 0,
            desired_access: 0x0012_0089,
            file_attributes: 0x80,
            share_access: 1,
            create_disposition: 1,
            create_options: 0,
            handle: 0,
            length: 0,
            name: utf16z(name),
        }
    }

    /// The name decoded up to the first NUL (lossy).
    pub fn name_str(&self) -> String {
        utf16_lossy(&self.name)
    }
}

/// `s` as UTF-16LE bytes with a terminating NUL.
pub fn utf16z(s: &str) -> Vec<u8> {
    s.encode_utf16()
        .chain(std::iter::once(0))
        .flat_map(|u| u.to_le_bytes())
        .collect()
}

/// Decodes UTF-16LE bytes up to the first NUL (an odd trailing byte is ignored).
pub fn utf16_lossy(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| {
            u16::from_le_bytes([
                c.first().copied().unwrap_or(0),
                c.get(1).copied().unwrap_or(0),
            ])
        })
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_round_trip_and_name() {
        let op = FileIoOp::Create(CreateFile::open("\\Windows\\x.sys"));
        let io = op.to_file_io();
        assert_eq!(io.file_name().as_deref(), Some("\\Windows\\x.sys"));
        let back = FileIo::parse(&io.encode()).unwrap();
        assert_eq!(back.op().unwrap(), op);
    }

    #[test]
    fn no_such_file_drops_the_name() {
        let io = FileIoOp::Create(CreateFile::open("a")).to_file_io();
        let r = io.reply_no_such_file();
        assert_eq!(r.encode().len(), 64);
        assert_eq!(r.status, 0xC000_000F);
    }
}
