//! Hits over time, per stack, in bounded memory: a histogram whose buckets double in width when
//! there would be too many of them.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// The most buckets a [`Timeline`] keeps; past this its buckets double in width. The plot
/// draws at most 120 buckets across the whole capture, so 256 per stack is enough.
pub const MAX_BUCKETS: usize = 256;

/// Counts per time bucket. Buckets are `width` seconds wide (a power of two, from 1 s) and
/// aligned to multiples of the width since the Unix epoch, so timelines of different widths
/// can be added into the wider one's buckets exactly.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Timeline {
    width_log2: u32,
    buckets: BTreeMap<i64, u64>,
}

/// Seconds since the Unix epoch, negative before it.
pub fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

impl Timeline {
    /// The bucket width in seconds.
    pub fn width(&self) -> i64 {
        1i64 << self.width_log2
    }

    /// Counts `n` at `t`.
    pub fn add(&mut self, t: SystemTime, n: u64) {
        let key = unix_seconds(t) >> self.width_log2;
        *self.buckets.entry(key).or_insert(0) += n;
        while self.buckets.len() > MAX_BUCKETS && self.width_log2 < 40 {
            self.width_log2 += 1;
            let old = std::mem::take(&mut self.buckets);
            for (k, v) in old {
                *self.buckets.entry(k >> 1).or_insert(0) += v;
            }
        }
    }

    /// The total in `[start, start + width)` for buckets of `width` seconds (a power of two at
    /// least [`Timeline::width`]), by bucket start in Unix seconds.
    pub fn rebucket(&self, width: i64) -> BTreeMap<i64, u64> {
        let width = width.max(self.width());
        let mut out = BTreeMap::new();
        for (&k, &v) in &self.buckets {
            let start = k << self.width_log2;
            *out.entry(start.div_euclid(width) * width).or_insert(0) += v;
        }
        out
    }

    /// The buckets kept: start (Unix seconds) and count.
    pub fn buckets(&self) -> impl Iterator<Item = (i64, u64)> + '_ {
        self.buckets
            .iter()
            .map(|(&k, &v)| (k << self.width_log2, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn buckets_widen_and_keep_the_total() {
        let mut t = Timeline::default();
        let start = UNIX_EPOCH + Duration::from_secs(1_795_309_200);
        for s in 0..5000u64 {
            t.add(start + Duration::from_secs(s), 1);
        }
        assert!(t.buckets().count() <= MAX_BUCKETS);
        assert_eq!(t.width(), 32);
        assert_eq!(t.buckets().map(|(_, v)| v).sum::<u64>(), 5000);
        let hourly = t.rebucket(4096);
        assert_eq!(hourly.values().sum::<u64>(), 5000);
        assert!(hourly.keys().all(|k| k % 4096 == 0));
    }
}
