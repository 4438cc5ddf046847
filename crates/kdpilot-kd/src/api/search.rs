//! DbgKdSearchMemoryApi (0x3156): DBGKD_SEARCH_MEMORY (SearchAddress u64 @16, SearchLength
//! u64 @24, PatternLength u32 @32), pattern appended. The reply carries the address found in
//! SearchAddress. A target that finds nothing answers STATUS_NO_MORE_ENTRIES; one that does
//! not support searching answers STATUS_UNSUCCESSFUL (then search host-side).

use super::get_version::expect_api;
use super::{number, Api, Manipulate};
use crate::wire::status;
use crate::{Arch, PayloadError};

/// STATUS_NO_MORE_ENTRIES: the search found nothing.
pub const STATUS_NO_MORE_ENTRIES: u32 = 0x8000_001A;

/// Search `length` bytes from `address` for a match starting in that range (the match may
/// end past it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchMemory {
    /// SearchAddress.
    pub address: u64,
    /// SearchLength.
    pub length: u64,
    /// The pattern (PatternLength = its length).
    pub pattern: Vec<u8>,
}

impl Api for SearchMemory {
    const NUMBER: u32 = number::SEARCH_MEMORY;
    /// The address of the first match, or `None` (STATUS_NO_MORE_ENTRIES).
    type Reply = Option<u64>;

    fn encode_request(&self, _arch: Arch) -> Manipulate {
        let mut m = Manipulate::request(Self::NUMBER, 0);
        let mut b = m.body_mut();
        b.u64(0, self.address);
        b.u64(8, self.length);
        b.u32(16, self.pattern.len() as u32);
        m.data = self.pattern.clone();
        m
    }

    fn decode_request(m: &Manipulate, _arch: Arch) -> Result<Self, PayloadError> {
        expect_api(m, Self::NUMBER)?;
        let b = m.body();
        let n = b.u32(16)? as usize;
        let pattern = m.data.get(..n).ok_or(PayloadError::Truncated {
            what: number::name(Self::NUMBER),
            need: n,
            have: m.data.len(),
        })?;
        Ok(Self {
            address: b.u64(0)?,
            length: b.u64(8)?,
            pattern: pattern.to_vec(),
        })
    }

    fn encode_reply(&self, found: &Option<u64>, _arch: Arch) -> Manipulate {
        let mut m = Manipulate::request(Self::NUMBER, 0);
        m.return_status = if found.is_some() {
            status::SUCCESS
        } else {
            STATUS_NO_MORE_ENTRIES
        };
        let mut b = m.body_mut();
        b.u64(0, found.unwrap_or(self.address));
        b.u64(8, self.length);
        b.u32(16, self.pattern.len() as u32);
        m
    }

    /// `Ok(None)` for STATUS_NO_MORE_ENTRIES; other failures (unsupported) are errors.
    fn decode_reply(&self, m: &Manipulate, _arch: Arch) -> Result<Option<u64>, PayloadError> {
        if m.api == Self::NUMBER && m.return_status == STATUS_NO_MORE_ENTRIES {
            return Ok(None);
        }
        m.check(Self::NUMBER)?;
        Ok(Some(m.body().u64(0)?))
    }
}
