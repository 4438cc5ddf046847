//! An in-memory target: 4 KiB pages in a `BTreeMap`, for tests and fuzzing.

use std::collections::BTreeMap;

use super::{MemoryReader, ReadError, PAGE_SIZE};

/// Sparse paged memory. Reads stop at the first unmapped page, like KD's ReadVirtualMemory.
/// Every read is logged (address, length) so tests can check what crossed the "link".
#[derive(Clone, Debug, Default)]
pub struct MockMemory {
    pages: BTreeMap<u64, Box<[u8]>>,
    reads: Vec<(u64, usize)>,
    fail_at: Option<u64>,
}

impl MockMemory {
    /// Empty memory: nothing mapped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `bytes` at `address`, mapping (zero-filled) pages as needed.
    pub fn write(&mut self, address: u64, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            let Some(a) = address.checked_add(i as u64) else {
                return;
            };
            let page = self
                .pages
                .entry(a / PAGE_SIZE)
                .or_insert_with(|| vec![0u8; PAGE_SIZE as usize].into_boxed_slice());
            page[(a % PAGE_SIZE) as usize] = b;
        }
    }

    /// Writes a little-endian u32.
    pub fn write_u32(&mut self, address: u64, value: u32) {
        self.write(address, &value.to_le_bytes());
    }

    /// Writes a little-endian u64.
    pub fn write_u64(&mut self, address: u64, value: u64) {
        self.write(address, &value.to_le_bytes());
    }

    /// Maps zero-filled pages over `[address, address + len)`.
    pub fn map_zeroed(&mut self, address: u64, len: u64) {
        let first = address / PAGE_SIZE;
        let last = address.saturating_add(len.saturating_sub(1)) / PAGE_SIZE;
        for p in first..=last {
            self.pages
                .entry(p)
                .or_insert_with(|| vec![0u8; PAGE_SIZE as usize].into_boxed_slice());
        }
    }

    /// Unmaps the page containing `address`.
    pub fn unmap_page(&mut self, address: u64) {
        self.pages.remove(&(address / PAGE_SIZE));
    }

    /// Makes every later read that touches `address` fail with [`ReadError::Failed`] (a lost
    /// link).
    pub fn fail_at(&mut self, address: Option<u64>) {
        self.fail_at = address;
    }

    /// The reads made so far, as (address, length).
    pub fn reads(&self) -> &[(u64, usize)] {
        &self.reads
    }

    /// Total bytes asked for by the reads made so far.
    pub fn bytes_asked(&self) -> u64 {
        self.reads.iter().map(|&(_, n)| n as u64).sum()
    }

    /// Forgets the read log.
    pub fn clear_reads(&mut self) {
        self.reads.clear();
    }

    /// Reads synchronously (no logging): the bytes a real target would return.
    pub fn peek(&self, address: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len.min(1 << 20));
        let mut a = address;
        while out.len() < len {
            let Some(page) = self.pages.get(&(a / PAGE_SIZE)) else {
                break;
            };
            let off = (a % PAGE_SIZE) as usize;
            let n = (page.len() - off).min(len - out.len());
            out.extend_from_slice(&page[off..off + n]);
            match a.checked_add(n as u64) {
                Some(next) => a = next,
                None => break,
            }
        }
        out
    }
}

impl MemoryReader for MockMemory {
    async fn read(&mut self, address: u64, len: usize) -> Result<Vec<u8>, ReadError> {
        self.reads.push((address, len));
        if let Some(f) = self.fail_at {
            if f >= address && f - address < len as u64 {
                return Err(ReadError::failed("the mock link is down"));
            }
        }
        Ok(self.peek(address, len))
    }
}
