//! Bounds-checked little-endian field access over byte slices. Every byte that came from the
//! target, a symbol server or a file goes through these: short input gives `None`, never a
//! panic.

/// A little-endian u16 at `offset`.
pub(crate) fn le_u16(b: &[u8], offset: usize) -> Option<u16> {
    let s = b.get(offset..offset.checked_add(2)?)?;
    Some(u16::from_le_bytes(s.try_into().ok()?))
}

/// A little-endian u32 at `offset`.
pub(crate) fn le_u32(b: &[u8], offset: usize) -> Option<u32> {
    let s = b.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

/// A little-endian u64 at `offset`.
pub(crate) fn le_u64(b: &[u8], offset: usize) -> Option<u64> {
    let s = b.get(offset..offset.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

/// `len` bytes at `offset`.
pub(crate) fn slice(b: &[u8], offset: usize, len: usize) -> Option<&[u8]> {
    b.get(offset..offset.checked_add(len)?)
}

/// A NUL-terminated byte string starting at `offset`, at most `max` bytes long (without the
/// terminator). Returns the bytes before the NUL, or `None` when no NUL is found in bounds.
pub(crate) fn c_string(b: &[u8], offset: usize, max: usize) -> Option<&[u8]> {
    let rest = b.get(offset..)?;
    let window = &rest[..rest.len().min(max.saturating_add(1))];
    let end = window.iter().position(|&c| c == 0)?;
    window.get(..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_none() {
        let b = [1u8, 2, 3];
        assert_eq!(le_u16(&b, 1), Some(0x0302));
        assert_eq!(le_u16(&b, 2), None);
        assert_eq!(le_u32(&b, 0), None);
        assert_eq!(le_u64(&b, usize::MAX), None);
        assert_eq!(slice(&b, usize::MAX, 2), None);
    }

    #[test]
    fn c_strings_are_bounded() {
        let b = b"abc\0def";
        assert_eq!(c_string(b, 0, 10), Some(&b"abc"[..]));
        assert_eq!(c_string(b, 0, 3), Some(&b"abc"[..]));
        assert_eq!(c_string(b, 0, 2), None);
        assert_eq!(c_string(b, 4, 10), None);
        assert_eq!(c_string(b, 9, 10), None);
    }
}
