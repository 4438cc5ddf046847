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

    /// Unmaps every page touching `[addr, addr+len)` (an image unloaded, a page paged out).
    pub fn unmap(&mut self, addr: u64, len: u64) {
        let first = addr & !(PAGE_SIZE - 1);
        let end = addr.saturating_add(len);
        let pages: Vec<u64> = self.pages.range(first..end).map(|(p, _)| *p).collect();
        for p in pages {
            self.pages.remove(&p);
        }
    }

    /// Unmaps everything (a reboot: nothing of the old kernel survives).
    pub fn clear(&mut self) {
        self.pages.clear();
    }

    /// Number of mapped pages.
    pub fn mapped_pages(&self) -> usize {
        self.pages.len()
    }

    /// Whether every byte of `[addr, addr+len)` is mapped.
    pub fn is_range_mapped(&self, addr: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let Some(last) = addr.checked_add(len - 1) else {
            return false;
        };
        let mut page = addr & !(PAGE_SIZE - 1);
        loop {
            if !self.pages.contains_key(&page) {
                return false;
            }
            if page >= (last & !(PAGE_SIZE - 1)) {
                return true;
            }
            page += PAGE_SIZE;
        }
    }

    /// Little-endian u64 read (`None` if not all mapped).
    pub fn read_u64(&self, addr: u64) -> Option<u64> {
        let b: [u8; 8] = self.read(addr, 8).try_into().ok()?;
        Some(u64::from_le_bytes(b))
    }

    /// Little-endian u32 read (`None` if not all mapped).
    pub fn read_u32(&self, addr: u64) -> Option<u32> {
        let b: [u8; 4] = self.read(addr, 4).try_into().ok()?;
        Some(u32::from_le_bytes(b))
    }

    /// Little-endian u16 write helper (mapped memory only).
    pub fn write_u16(&mut self, addr: u64, v: u16) {
        self.write(addr, &v.to_le_bytes());
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

/// A bump allocator over a reserved range of kernel virtual addresses (the simulator's
/// nonpaged pool: module list entries, KPCR/KPRCB, threads, stacks, strings). Pages are mapped
/// as they are handed out; nothing is ever freed (a reboot starts a new pool).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    /// First address of the range.
    pub base: u64,
    /// Next free address.
    pub next: u64,
    /// End of the range (exclusive).
    pub end: u64,
}

impl Pool {
    /// A pool over `[base, base + len)`.
    pub fn new(base: u64, len: u64) -> Self {
        Self {
            base,
            next: base,
            end: base.saturating_add(len),
        }
    }

    /// Allocates `len` bytes, 16-byte aligned, zeroed and mapped. When the range is exhausted
    /// the allocation still succeeds past its end (the simulator never runs out), so callers
    /// need no error path.
    pub fn alloc(&mut self, memory: &mut Memory, len: u64) -> u64 {
        self.alloc_aligned(memory, len, 16)
    }

    /// Allocates `len` bytes aligned to `align` (a power of two), zeroed and mapped.
    pub fn alloc_aligned(&mut self, memory: &mut Memory, len: u64, align: u64) -> u64 {
        let align = align.max(1);
        let at = self.next.div_ceil(align).wrapping_mul(align);
        self.next = at.saturating_add(len.max(1));
        memory.map(at, len.max(1));
        // Fresh pool memory is zero, also where a page was shared with an earlier allocation.
        memory.write(at, &vec![0u8; len as usize]);
        at
    }
}
