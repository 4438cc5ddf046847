//! A reader that caches and coalesces: every byte crosses the slow link at most once per stop,
//! and bytes of images (marked stable) at most once per session.

use std::collections::{BTreeMap, BTreeSet};

use super::{MemoryReader, ReadError, KD_MAX_READ, PAGE_SIZE};

/// How [`CachedReader`] shapes the reads it sends to the reader below.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// The largest single read sent below (one KD packet: [`KD_MAX_READ`]).
    pub max_read: usize,
    /// Misses are widened to multiples of this many bytes (a power of two, at most a page).
    pub granule: u64,
    /// A miss fetches at least this many bytes, without running past the end of the page the
    /// request ends in (so read-ahead never probes an unmapped page). 0 by default: each KD
    /// read costs about 160 bytes of packets and acknowledgements, so guessing pays only where
    /// the caller knows it will read on (the stack walker asks for windows itself).
    pub readahead: u64,
    /// Each of the two caches (stable, volatile) is emptied when it would grow past this.
    pub max_cached_bytes: usize,
    /// The most one `read` call returns; longer requests get a prefix.
    pub max_request: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_read: KD_MAX_READ,
            granule: 64,
            readahead: 0,
            max_cached_bytes: 64 << 20,
            max_request: 16 << 20,
        }
    }
}

/// Counters for benchmarks: what callers asked for against what crossed to the reader below.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Calls to [`CachedReader`]'s `read`.
    pub requests: u64,
    /// Bytes those calls asked for.
    pub bytes_requested: u64,
    /// Bytes served from the cache.
    pub bytes_from_cache: u64,
    /// Reads sent to the reader below.
    pub underlying_reads: u64,
    /// Bytes those reads asked for.
    pub bytes_read: u64,
    /// Bytes the reader below returned.
    pub bytes_received: u64,
}

/// Non-overlapping cached extents, keyed by start address.
#[derive(Debug, Default)]
struct Extents {
    map: BTreeMap<u64, Vec<u8>>,
    bytes: usize,
}

impl Extents {
    /// The extent covering `addr`.
    fn covering(&self, addr: u64) -> Option<(u64, &[u8])> {
        let (&start, data) = self.map.range(..=addr).next_back()?;
        let end = start.checked_add(data.len() as u64)?;
        (addr < end).then_some((start, data.as_slice()))
    }

    /// The start of the first extent after `addr`.
    fn next_start_after(&self, addr: u64) -> Option<u64> {
        let from = addr.checked_add(1)?;
        self.map.range(from..).next().map(|(&s, _)| s)
    }

    /// The end of the last extent that starts at or before `addr`.
    fn prev_end(&self, addr: u64) -> Option<u64> {
        let (&start, data) = self.map.range(..=addr).next_back()?;
        start.checked_add(data.len() as u64)
    }

    fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }

    /// Inserts `data` at `start`, merging with touching or overlapping extents (new bytes win).
    fn insert(&mut self, start: u64, data: &[u8]) {
        let Some(end) = start.checked_add(data.len() as u64) else {
            return;
        };
        if data.is_empty() {
            return;
        }
        let mut lo = start;
        let mut hi = end;
        let touching: Vec<u64> = self
            .map
            .range(..=end)
            .rev()
            .take_while(|(&s, d)| s.saturating_add(d.len() as u64) >= start)
            .map(|(&s, _)| s)
            .collect();
        let mut olds = Vec::with_capacity(touching.len());
        for s in touching {
            if let Some(d) = self.map.remove(&s) {
                self.bytes -= d.len();
                lo = lo.min(s);
                hi = hi.max(s.saturating_add(d.len() as u64));
                olds.push((s, d));
            }
        }
        let mut merged = vec![0u8; (hi - lo) as usize];
        for (s, d) in olds {
            let off = (s - lo) as usize;
            merged[off..off + d.len()].copy_from_slice(&d);
        }
        let off = (start - lo) as usize;
        merged[off..off + data.len()].copy_from_slice(data);
        self.bytes += merged.len();
        self.map.insert(lo, merged);
    }
}

/// A [`MemoryReader`] that caches what it read and shapes misses into few, KD-packet-sized
/// reads.
///
/// Memory is in one of two classes. Ranges marked with [`mark_stable`](Self::mark_stable)
/// (image headers, code, read-only data) survive [`new_stop`](Self::new_stop); everything else
/// (stacks, pool, the module list) is volatile and dropped at every stop. Pages found
/// unreadable are remembered until the next stop, since paging can change them.
#[derive(Debug)]
pub struct CachedReader<R> {
    inner: R,
    config: CacheConfig,
    stable: Extents,
    volatile: Extents,
    /// Sorted, merged, half-open ranges.
    stable_ranges: Vec<(u64, u64)>,
    unreadable_pages: BTreeSet<u64>,
    stats: ReadStats,
}

impl<R: MemoryReader> CachedReader<R> {
    /// Wraps `inner` with the default configuration.
    pub fn new(inner: R) -> Self {
        Self::with_config(inner, CacheConfig::default())
    }

    /// Wraps `inner`. Nonsensical values are corrected: `max_read` at least 1, `granule` a
    /// power of two between 1 and a page.
    pub fn with_config(inner: R, mut config: CacheConfig) -> Self {
        config.max_read = config.max_read.max(1);
        config.max_request = config.max_request.max(1);
        if !config.granule.is_power_of_two() || config.granule > PAGE_SIZE {
            config.granule = 64;
        }
        CachedReader {
            inner,
            config,
            stable: Extents::default(),
            volatile: Extents::default(),
            stable_ranges: Vec::new(),
            unreadable_pages: BTreeSet::new(),
            stats: ReadStats::default(),
        }
    }

    /// The reader below.
    pub fn inner(&self) -> &R {
        &self.inner
    }

    /// The reader below, mutably (reads made through it bypass the cache).
    pub fn inner_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Unwraps the reader below.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The counters since creation or the last [`reset_stats`](Self::reset_stats).
    pub fn stats(&self) -> ReadStats {
        self.stats
    }

    /// Zeroes the counters.
    pub fn reset_stats(&mut self) {
        self.stats = ReadStats::default();
    }

    /// Bytes currently cached as (stable, volatile).
    pub fn cached_bytes(&self) -> (usize, usize) {
        (self.stable.bytes, self.volatile.bytes)
    }

    /// Declares `[start, start + len)` as memory that does not change while the module stays
    /// loaded (image headers, code, read-only data). Its cached bytes survive
    /// [`new_stop`](Self::new_stop). Volatile bytes already cached there are dropped.
    pub fn mark_stable(&mut self, start: u64, len: u64) {
        let end = start.saturating_add(len);
        if end <= start {
            return;
        }
        self.stable_ranges.push((start, end));
        self.stable_ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.stable_ranges.len());
        for &(s, e) in &self.stable_ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.stable_ranges = merged;
        // Volatile extents overlapping the new stable range would shadow nothing (lookups go
        // by class), but they waste space: drop them.
        self.volatile.clear();
    }

    /// Forgets all stable ranges and their cached bytes (a module was unloaded, the target
    /// rebooted).
    pub fn clear_stable_ranges(&mut self) {
        self.stable_ranges.clear();
        self.stable.clear();
    }

    /// The target ran and stopped again: drops volatile bytes and what was learnt about
    /// unreadable pages, keeps stable bytes.
    pub fn new_stop(&mut self) {
        self.invalidate_volatile();
    }

    /// Same as [`new_stop`](Self::new_stop).
    pub fn invalidate_volatile(&mut self) {
        self.volatile.clear();
        self.unreadable_pages.clear();
    }

    /// Drops everything cached, stable ranges included.
    pub fn invalidate_all(&mut self) {
        self.volatile.clear();
        self.unreadable_pages.clear();
        self.clear_stable_ranges();
    }

    /// (is stable, segment start, segment end) for the class segment containing `addr`.
    fn classify(&self, addr: u64) -> (bool, u64, u64) {
        let idx = self.stable_ranges.partition_point(|&(s, _)| s <= addr);
        if idx > 0 {
            let (s, e) = self.stable_ranges[idx - 1];
            if addr < e {
                return (true, s, e);
            }
        }
        let seg_start = if idx > 0 {
            self.stable_ranges[idx - 1].1
        } else {
            0
        };
        let seg_end = self
            .stable_ranges
            .get(idx)
            .map(|&(s, _)| s)
            .unwrap_or(u64::MAX);
        (false, seg_start, seg_end)
    }

    fn cache(&self, stable: bool) -> &Extents {
        if stable {
            &self.stable
        } else {
            &self.volatile
        }
    }

    /// Fetches at least `[pos, gap_end)` (which is not cached) into the cache of its class.
    async fn fetch(
        &mut self,
        pos: u64,
        gap_end: u64,
        stable: bool,
        seg: (u64, u64),
    ) -> Result<(), ReadError> {
        let page_start = pos & !(PAGE_SIZE - 1);
        let last_page_end = ((gap_end - 1) & !(PAGE_SIZE - 1)).saturating_add(PAGE_SIZE);
        let cache = self.cache(stable);
        let mut start = pos & !(self.config.granule - 1);
        start = start.max(seg.0).max(page_start);
        if let Some(prev_end) = cache.prev_end(pos) {
            start = start.max(prev_end.min(pos));
        }
        let aligned_end = gap_end
            .checked_add(self.config.granule - 1)
            .map(|e| e & !(self.config.granule - 1))
            .unwrap_or(gap_end);
        let wanted = aligned_end.max(start.saturating_add(self.config.readahead));
        let mut end = gap_end.max(wanted.min(last_page_end));
        end = end.min(seg.1);
        if let Some(next) = cache.next_start_after(pos) {
            end = end.min(next);
        }
        let end = end.max(gap_end);

        let mut cur = start;
        while cur < end {
            let n = ((end - cur) as usize).min(self.config.max_read);
            self.stats.underlying_reads += 1;
            self.stats.bytes_read += n as u64;
            let data = match self.inner.read(cur, n).await {
                Ok(d) => d,
                Err(ReadError::Unreadable { .. }) => Vec::new(),
                Err(e) => return Err(e),
            };
            let got = data.len().min(n);
            self.stats.bytes_received += got as u64;
            if got > 0 {
                let incoming = got;
                let class = if stable {
                    &mut self.stable
                } else {
                    &mut self.volatile
                };
                if class.bytes + incoming > self.config.max_cached_bytes {
                    class.clear();
                }
                class.insert(cur, &data[..got]);
            }
            if got < n {
                let stop = cur + got as u64;
                if got == 0 || stop % PAGE_SIZE == 0 {
                    self.unreadable_pages.insert(stop / PAGE_SIZE);
                }
                break;
            }
            cur += n as u64;
        }
        Ok(())
    }
}

impl<R: MemoryReader> MemoryReader for CachedReader<R> {
    async fn read(&mut self, address: u64, len: usize) -> Result<Vec<u8>, ReadError> {
        let len = len.min(self.config.max_request);
        self.stats.requests += 1;
        self.stats.bytes_requested += len as u64;
        let end = address.saturating_add(len as u64);
        let mut out = Vec::with_capacity(len);
        let mut pos = address;
        while pos < end {
            let (stable, seg_start, seg_end) = self.classify(pos);
            if let Some((s, data)) = self.cache(stable).covering(pos) {
                let avail_end = (s + data.len() as u64).min(end).min(seg_end);
                let off = (pos - s) as usize;
                let n = (avail_end - pos) as usize;
                out.extend_from_slice(&data[off..off + n]);
                self.stats.bytes_from_cache += n as u64;
                pos = avail_end;
                continue;
            }
            if self.unreadable_pages.contains(&(pos / PAGE_SIZE)) {
                break;
            }
            let mut gap_end = end.min(seg_end);
            if let Some(next) = self.cache(stable).next_start_after(pos) {
                gap_end = gap_end.min(next);
            }
            if let Some(&page) = self.unreadable_pages.range(pos / PAGE_SIZE + 1..).next() {
                gap_end = gap_end.min(page.saturating_mul(PAGE_SIZE));
            }
            self.fetch(pos, gap_end, stable, (seg_start, seg_end))
                .await?;
            let Some((s, data)) = self.cache(stable).covering(pos) else {
                break;
            };
            // Served on the next turn of the loop; do not count it as a cache hit.
            let avail_end = (s + data.len() as u64).min(end).min(seg_end);
            let off = (pos - s) as usize;
            let n = (avail_end - pos) as usize;
            out.extend_from_slice(&data[off..off + n]);
            pos = avail_end;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MockMemory;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    fn mock() -> MockMemory {
        let mut m = MockMemory::new();
        let bytes: Vec<u8> = (0..0x3000u32).map(|i| (i * 7 + 3) as u8).collect();
        m.write(0x10000, &bytes);
        m
    }

    #[test]
    fn second_read_is_served_from_cache() {
        block_on(async {
            let mut r = CachedReader::new(mock());
            let a = r.read(0x10010, 16).await.unwrap();
            let b = r.read(0x10010, 16).await.unwrap();
            assert_eq!(a, b);
            assert_eq!(a[0], ((0x10u32 * 7 + 3) as u8));
            let s = r.stats();
            assert_eq!(s.underlying_reads, 1);
            assert_eq!(s.bytes_from_cache, 16);
            // Granule rounding made the neighbourhood a hit too.
            r.read(0x10030, 16).await.unwrap();
            assert_eq!(r.stats().underlying_reads, 1);
        });
    }

    #[test]
    fn large_reads_are_split_into_kd_packets() {
        block_on(async {
            let mut r = CachedReader::new(mock());
            let got = r.read(0x10000, 0x3000).await.unwrap();
            assert_eq!(got.len(), 0x3000);
            let reads = r.inner().reads().to_vec();
            assert!(reads.iter().all(|&(_, n)| n <= KD_MAX_READ), "{reads:x?}");
            assert_eq!(reads.len(), 4); // 12288 / 3944 rounded up
            assert_eq!(r.stats().bytes_read, 0x3000);
        });
    }

    #[test]
    fn short_read_at_unmapped_page_is_remembered_until_the_next_stop() {
        block_on(async {
            let mut r = CachedReader::new(mock());
            let got = r.read(0x12ff0, 0x40).await.unwrap();
            assert_eq!(got.len(), 0x10);
            let n = r.inner().reads().len();
            let again = r.read(0x13000, 8).await.unwrap();
            assert!(again.is_empty());
            assert_eq!(
                r.inner().reads().len(),
                n,
                "unreadable page not asked again"
            );
            r.new_stop();
            r.inner_mut().write(0x13000, &[9; 8]);
            assert_eq!(r.read(0x13000, 8).await.unwrap(), vec![9; 8]);
        });
    }

    #[test]
    fn volatile_bytes_are_dropped_at_a_stop_and_stable_ones_kept() {
        block_on(async {
            let mut r = CachedReader::new(mock());
            r.mark_stable(0x10000, 0x1000);
            r.read(0x10000, 8).await.unwrap();
            r.read(0x11000, 8).await.unwrap();
            r.inner_mut().write(0x10000, &[1; 8]);
            r.inner_mut().write(0x11000, &[2; 8]);
            r.new_stop();
            assert_ne!(
                r.read(0x10000, 8).await.unwrap(),
                vec![1; 8],
                "stable: cached"
            );
            assert_eq!(
                r.read(0x11000, 8).await.unwrap(),
                vec![2; 8],
                "volatile: re-read"
            );
        });
    }

    #[test]
    fn reads_straddling_classes_and_extents_are_complete() {
        block_on(async {
            let mut r = CachedReader::new(mock());
            r.mark_stable(0x10800, 0x100);
            let direct = mock();
            for (a, n) in [
                (0x107f0u64, 0x40usize),
                (0x10000, 0x2000),
                (0x108f8, 0x10),
                (0x10001, 3),
                (0x10ffe, 0x1004),
            ] {
                let got = r.read(a, n).await.unwrap();
                let mut d = direct.clone();
                let want = d.read(a, n).await.unwrap();
                assert_eq!(got, want, "{a:#x}+{n:#x}");
            }
        });
    }

    #[test]
    fn extents_merge() {
        let mut e = Extents::default();
        e.insert(10, &[1, 2]);
        e.insert(14, &[5]);
        e.insert(12, &[3, 4]);
        assert_eq!(e.map.len(), 1);
        assert_eq!(e.covering(14), Some((10, &[1u8, 2, 3, 4, 5][..])));
        e.insert(9, &[0, 7]);
        assert_eq!(e.covering(9), Some((9, &[0u8, 7, 2, 3, 4, 5][..])));
        assert_eq!(e.bytes, 6);
        e.insert(u64::MAX - 1, &[1, 2, 3]);
        assert_eq!(e.bytes, 6);
    }
}
