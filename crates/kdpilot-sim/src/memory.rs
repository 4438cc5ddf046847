//! Target memory with page granularity: reads stop at the first unmapped page, as a real
//! kernel's MmDbgCopyMemory does (the reply then carries the bytes up to that page and
//! STATUS_UNSUCCESSFUL).

use std::collections::BTreeMap;

/// Page size of the simulated machine.
pub const PAGE_SIZE: u64 = 0x1000;

/// Sparse paged memory.
#[derive(Clone, Debug, Default)]
pub struct Memory {
    pages: BTreeMap<u64, Box<[u8]>>,
}

impl Memory {
    /// Empty memory (nothing mapped).
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps (zero-filled) every page touching `[addr, addr+len)`.
    pub fn map(&mut self, addr: u64, len: u64) {
        let first = addr & !(PAGE_SIZE - 1);
        let mut page = first;
        while page < addr.saturating_add(len) {
            self.pages
                .entry(page)
                .or_insert_with(|| vec![0u8; PAGE_SIZE as usize].into_boxed_slice());
            page = match page.checked_add(PAGE_SIZE) {
                Some(p) => p,
                None => break,
            };
        }
    }

    /// Whether the byte at `addr` is mapped.
    pub fn is_mapped(&self, addr: u64) -> bool {
        self.pages.contains_key(&(addr & !(PAGE_SIZE - 1)))
    }

    /// Maps and writes `bytes` at `addr`.
    pub fn load(&mut self, addr: u64, bytes: &[u8]) {
        self.map(addr, bytes.len() as u64);
        self.write(addr, bytes);
    }

    /// Reads up to `len` bytes; the result is shorter if an unmapped page is reached.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut a = addr;
        while out.len() < len {
            let page = a & !(PAGE_SIZE - 1);
            let Some(p) = self.pages.get(&page) else {
                break;
            };
            let off = (a - page) as usize;
            let n = (len - out.len()).min(PAGE_SIZE as usize - off);
            out.extend_from_slice(p.get(off..off + n).unwrap_or(&[]));
            a = a.wrapping_add(n as u64);
        }
        out
    }

    /// Writes as many bytes as are mapped from `addr`; returns how many were written.
    pub fn write(&mut self, addr: u64, bytes: &[u8]) -> usize {
        let mut done = 0;
        let mut a = addr;
        while done < bytes.len() {
            let page = a & !(PAGE_SIZE - 1);
            let Some(p) = self.pages.get_mut(&page) else {
                break;
            };
            let off = (a - page) as usize;
            let n = (bytes.len() - done).min(PAGE_SIZE as usize - off);
            if let (Some(dst), Some(src)) = (p.get_mut(off..off + n), bytes.get(done..done + n)) {
                dst.copy_from_slice(src);
            }
            done += n;
            a = a.wrapping_add(n as u64);
        }
        done
    }

    /// Little-endian u64 write helper (mapped memory only).
    pub fn write_u64(&mut self, addr: u64, v: u64) {
        self.write(addr, &v.to_le_bytes());
    }

    /// Little-endian u32 write helper (mapped memory only).
    pub fn write_u32(&mut self, addr: u64, v: u32) {
        self.write(addr, &v.to_le_bytes());
    }
}
