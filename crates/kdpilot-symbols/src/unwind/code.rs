//! What the unwinders need from a module's image: bytes at an RVA (from the local image file,
//! or, when allowed, from target memory), RUNTIME_FUNCTION lookups, and "is this a return
//! address" checks.

use crate::bytes::le_u32;
use crate::memory::{MemoryReader, ReadError};
use crate::module_set::{Module, ModuleSet};
use crate::pe::DIR_EXCEPTION;

/// One RUNTIME_FUNCTION.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RuntimeFunction {
    pub begin: u32,
    pub end: u32,
    pub unwind_info: u32,
}

impl RuntimeFunction {
    fn parse(b: &[u8]) -> Option<Self> {
        Some(RuntimeFunction {
            begin: le_u32(b, 0)?,
            end: le_u32(b, 4)?,
            unwind_info: le_u32(b, 8)?,
        })
    }
}

/// The most RUNTIME_FUNCTIONs looked at in one table (ntoskrnl has about 30,000).
const MAX_RUNTIME_FUNCTIONS: u32 = 1 << 20;

/// Access to one module's bytes.
pub(crate) struct Code<'m> {
    pub module: &'m Module,
    pub remote: bool,
}

/// Maps "not readable" to `None`, keeps reader failures.
pub(crate) fn soft<T>(r: Result<T, ReadError>) -> Result<Option<T>, ReadError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(ReadError::Unreadable { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

impl<'m> Code<'m> {
    /// Exactly `len` bytes at `rva`, from the local image or (if allowed) target memory.
    pub async fn bytes<R: MemoryReader>(
        &self,
        reader: &mut R,
        rva: u32,
        len: usize,
    ) -> Result<Option<Vec<u8>>, ReadError> {
        if let Some(img) = &self.module.image {
            return Ok(img.read_rva(rva, len).map(<[u8]>::to_vec));
        }
        if self.remote
            && self.module.headers.is_some()
            && u64::from(rva) < u64::from(self.module.size)
        {
            let addr = self.module.base.wrapping_add(u64::from(rva));
            let b = match soft(reader.read(addr, len).await)? {
                Some(b) => b,
                None => return Ok(None),
            };
            return Ok((b.len() == len).then_some(b));
        }
        Ok(None)
    }

    /// Up to `len` bytes at `rva` (fewer at the end of a section).
    pub async fn bytes_upto<R: MemoryReader>(
        &self,
        reader: &mut R,
        rva: u32,
        len: usize,
    ) -> Result<Option<Vec<u8>>, ReadError> {
        if let Some(img) = &self.module.image {
            return Ok(img.at_rva(rva).map(|b| b[..b.len().min(len)].to_vec()));
        }
        if self.remote
            && self.module.headers.is_some()
            && u64::from(rva) < u64::from(self.module.size)
        {
            let addr = self.module.base.wrapping_add(u64::from(rva));
            return soft(reader.read(addr, len).await);
        }
        Ok(None)
    }

    /// The exception directory (RVA, entry count), if the module has unwind data we may read.
    fn exception_directory(&self) -> Option<(u32, u32)> {
        let headers = if let Some(img) = &self.module.image {
            img.headers()
        } else if self.remote {
            self.module.headers.as_ref()?
        } else {
            return None;
        };
        let d = headers.directory(DIR_EXCEPTION)?;
        Some((d.rva, (d.size / 12).min(MAX_RUNTIME_FUNCTIONS)))
    }

    /// Whether unwind data for this module can be had at all.
    pub fn has_unwind_data(&self) -> bool {
        self.exception_directory().is_some()
    }

    /// The RUNTIME_FUNCTION covering `rva`: binary search, one 12-byte entry at a time.
    pub async fn lookup_function<R: MemoryReader>(
        &self,
        reader: &mut R,
        rva: u32,
    ) -> Result<Option<RuntimeFunction>, ReadError> {
        let Some((dir, count)) = self.exception_directory() else {
            return Ok(None);
        };
        let (mut lo, mut hi) = (0u32, count);
        let mut steps = 0;
        while lo < hi && steps < 40 {
            steps += 1;
            let mid = lo + (hi - lo) / 2;
            let Some(entry_rva) = dir.checked_add(mid * 12) else {
                return Ok(None);
            };
            let Some(b) = self.bytes(reader, entry_rva, 12).await? else {
                return Ok(None);
            };
            let Some(f) = RuntimeFunction::parse(&b) else {
                return Ok(None);
            };
            if rva < f.begin {
                hi = mid;
            } else if rva >= f.end {
                lo = mid + 1;
            } else {
                return Ok(Some(f));
            }
        }
        Ok(None)
    }
}

/// Whether the bytes just before a return address end in a CALL instruction: `E8 rel32`, or
/// `FF /2` in any addressing form, with or without a REX prefix.
pub(crate) fn preceded_by_call(before: &[u8]) -> bool {
    let n = before.len();
    if n >= 5 && before[n - 5] == 0xE8 {
        return true;
    }
    for k in 2..=n.min(8) {
        let at = n - k;
        if before[at] != 0xFF {
            continue;
        }
        let Some(&modrm) = before.get(at + 1) else {
            continue;
        };
        if (modrm >> 3) & 7 != 2 {
            continue;
        }
        let md = modrm >> 6;
        let rm = modrm & 7;
        let sib = before.get(at + 2).copied();
        let sib_base5 = sib.is_some_and(|s| s & 7 == 5);
        let len = match (md, rm) {
            (3, _) => 2,
            (0, 5) => 6,
            (0, 4) => {
                if sib_base5 {
                    7
                } else {
                    3
                }
            }
            (0, _) => 2,
            (1, 4) => 4,
            (1, _) => 3,
            (2, 4) => 7,
            (2, _) => 6,
            _ => continue,
        };
        if len == k {
            return true;
        }
    }
    false
}

/// Whether `address` looks like a return address: inside a module's code and, when that
/// module's image file is at hand, right after a CALL.
pub(crate) fn looks_like_return_address(modules: &ModuleSet, address: u64) -> bool {
    let Some(m) = modules.find(address) else {
        return false;
    };
    if !m.is_code(address.wrapping_sub(1)) {
        return false;
    }
    let Some(img) = &m.image else {
        return true;
    };
    let Some(rva) = m.rva(address) else {
        return false;
    };
    let start = rva.saturating_sub(8);
    let Some(bytes) = img.read_rva(start, (rva - start) as usize) else {
        // Not in the file (the bytes are in another section, or padding): trust the section.
        return true;
    };
    preceded_by_call(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_forms() {
        assert!(preceded_by_call(&[0x90, 0x90, 0x90, 0xE8, 1, 2, 3, 4]));
        assert!(preceded_by_call(&[0xFF, 0xD3])); // call rbx
        assert!(preceded_by_call(&[0x41, 0xFF, 0xD0])); // call r8
        assert!(preceded_by_call(&[0xFF, 0x15, 1, 2, 3, 4])); // call [rip+disp32]
        assert!(preceded_by_call(&[0xFF, 0x55, 0x08])); // call [rbp+8]
        assert!(preceded_by_call(&[0xFF, 0x14, 0x24])); // call [rsp]
        assert!(preceded_by_call(&[0xFF, 0x54, 0x24, 0x08])); // call [rsp+8]
        assert!(preceded_by_call(&[0xFF, 0x90, 1, 2, 3, 4])); // call [rax+disp32]
        assert!(!preceded_by_call(&[0x90, 0x90, 0x90]));
        assert!(!preceded_by_call(&[0xFF, 0xE0])); // jmp rax
        assert!(!preceded_by_call(&[]));
        assert!(!preceded_by_call(&[0xFF]));
    }
}
