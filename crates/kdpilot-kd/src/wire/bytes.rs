//! Bounds-checked little-endian field access for wire structures.
//!
//! Every structure in this crate is read with explicit offsets from the reference sheet rather
//! than through `repr(packed)` casts: short or hostile input becomes a [`PayloadError`], never a
//! panic.

use crate::PayloadError;

/// Reads little-endian fields at absolute offsets of a byte slice.
#[derive(Clone, Copy, Debug)]
pub struct Fields<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Fields<'a> {
    /// Wraps `bytes`; `what` names the structure in error messages.
    pub fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self { bytes, what }
    }

    /// The whole slice.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// `len` bytes at `off`.
    pub fn slice(&self, off: usize, len: usize) -> Result<&'a [u8], PayloadError> {
        off.checked_add(len)
            .and_then(|end| self.bytes.get(off..end))
            .ok_or(PayloadError::Truncated {
                what: self.what,
                need: off.saturating_add(len),
                have: self.bytes.len(),
            })
    }

    /// Everything from `off` to the end (empty when `off` is past the end).
    pub fn rest(&self, off: usize) -> &'a [u8] {
        self.bytes.get(off..).unwrap_or(&[])
    }

    fn array<const N: usize>(&self, off: usize) -> Result<[u8; N], PayloadError> {
        let s = self.slice(off, N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// u8 at `off`.
    pub fn u8(&self, off: usize) -> Result<u8, PayloadError> {
        Ok(self.array::<1>(off)?[0])
    }
    /// Little-endian u16 at `off`.
    pub fn u16(&self, off: usize) -> Result<u16, PayloadError> {
        Ok(u16::from_le_bytes(self.array(off)?))
    }
    /// Little-endian u32 at `off`.
    pub fn u32(&self, off: usize) -> Result<u32, PayloadError> {
        Ok(u32::from_le_bytes(self.array(off)?))
    }
    /// Little-endian u64 at `off`.
    pub fn u64(&self, off: usize) -> Result<u64, PayloadError> {
        Ok(u64::from_le_bytes(self.array(off)?))
    }
    /// Fixed-size array at `off`.
    pub fn bytes_at<const N: usize>(&self, off: usize) -> Result<[u8; N], PayloadError> {
        self.array(off)
    }
}

/// Writes little-endian fields at absolute offsets into a fixed buffer; out-of-range writes are
/// ignored by construction because every caller writes constant offsets inside its own buffer
/// (checked by the tests of each structure).
#[derive(Debug)]
pub struct FieldsMut<'a> {
    bytes: &'a mut [u8],
}

impl<'a> FieldsMut<'a> {
    /// Wraps a buffer.
    pub fn new(bytes: &'a mut [u8]) -> Self {
        Self { bytes }
    }
    /// Copies `src` to `off` (truncated at the end of the buffer).
    pub fn put(&mut self, off: usize, src: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(off..) {
            let n = dst.len().min(src.len());
            if let (Some(d), Some(s)) = (dst.get_mut(..n), src.get(..n)) {
                d.copy_from_slice(s);
            }
        }
    }
    /// u8 at `off`.
    pub fn u8(&mut self, off: usize, v: u8) {
        self.put(off, &[v]);
    }
    /// Little-endian u16 at `off`.
    pub fn u16(&mut self, off: usize, v: u16) {
        self.put(off, &v.to_le_bytes());
    }
    /// Little-endian u32 at `off`.
    pub fn u32(&mut self, off: usize, v: u32) {
        self.put(off, &v.to_le_bytes());
    }
    /// Little-endian u64 at `off`.
    pub fn u64(&mut self, off: usize, v: u64) {
        self.put(off, &v.to_le_bytes());
    }
}

/// Sign-extends a 32-bit target address the way 32-bit Windows kernels report them
/// (0x804d8000 -> 0xffffffff804d8000).
pub fn sign_extend32(v: u32) -> u64 {
    v as i32 as i64 as u64
}
