//! Reading target memory: the [`MemoryReader`] trait everything in this crate reads through,
//! a caching and coalescing wrapper ([`CachedReader`]) and an in-memory fake ([`MockMemory`]).
//!
//! The trait uses `async fn` in a trait (stable since Rust 1.75). That keeps implementations
//! plain `async fn`s and works with tokio; the price is that the trait is not dyn-compatible,
//! so the walkers in this crate are generic over `R: MemoryReader` rather than taking
//! `&mut dyn MemoryReader`. No `Send` bound is imposed on the returned future: a reader whose
//! future is `Send` (a KD session on tokio) yields `Send` walker futures once the concrete
//! type is known, and a reader whose future is not can still be used on a current-thread
//! runtime.

mod cached;
mod mock;

pub use cached::{CacheConfig, CachedReader, ReadStats};
pub use mock::MockMemory;

use kdpilot_kd::Arch;

/// Why a read of target memory failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Nothing is readable at `address` (unmapped or paged out). Walkers treat this as the end of
    /// what can be learnt there, not as the end of the session.
    #[error("target memory at {address:#x} is not readable")]
    Unreadable {
        /// The first address that could not be read.
        address: u64,
    },
    /// The reader itself failed (link lost, target no longer stopped, ...). Walkers stop and
    /// pass this up.
    #[error("reading target memory failed")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ReadError {
    /// Wraps any error as [`ReadError::Failed`].
    pub fn failed(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        ReadError::Failed(error.into())
    }

    /// Whether this only says "that address is not readable" (the session goes on).
    pub fn is_unreadable(&self) -> bool {
        matches!(self, ReadError::Unreadable { .. })
    }
}

/// Reads virtual memory of a stopped target.
///
/// `read` returns up to `len` bytes starting at `address`. It may return fewer (a prefix,
/// possibly empty) when the range runs into memory that is not readable, as KD's
/// ReadVirtualMemory does at an unmapped page. `Err` is for failures of the reader itself;
/// implementations may also report an unreadable start address as [`ReadError::Unreadable`].
pub trait MemoryReader {
    /// Reads up to `len` bytes at `address`.
    #[allow(async_fn_in_trait)] // see the module docs: Send-ness is left to the implementation
    async fn read(&mut self, address: u64, len: usize) -> Result<Vec<u8>, ReadError>;
}

impl<R: MemoryReader + ?Sized> MemoryReader for &mut R {
    async fn read(&mut self, address: u64, len: usize) -> Result<Vec<u8>, ReadError> {
        (**self).read(address, len).await
    }
}

/// Convenience reads on top of [`MemoryReader`]: exact lengths and little-endian integers.
#[allow(async_fn_in_trait)]
pub trait MemoryReaderExt: MemoryReader {
    /// Reads exactly `len` bytes or fails with [`ReadError::Unreadable`] at the first missing
    /// byte.
    async fn read_exact(&mut self, address: u64, len: usize) -> Result<Vec<u8>, ReadError> {
        let bytes = self.read(address, len).await?;
        if bytes.len() < len {
            return Err(ReadError::Unreadable {
                address: address.wrapping_add(bytes.len() as u64),
            });
        }
        Ok(bytes)
    }

    /// Reads a little-endian u16.
    async fn read_u16(&mut self, address: u64) -> Result<u16, ReadError> {
        let b = self.read_exact(address, 2).await?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    /// Reads a little-endian u32.
    async fn read_u32(&mut self, address: u64) -> Result<u32, ReadError> {
        let b = self.read_exact(address, 4).await?;
        Ok(crate::bytes::le_u32(&b, 0).unwrap_or(0))
    }

    /// Reads a little-endian u64.
    async fn read_u64(&mut self, address: u64) -> Result<u64, ReadError> {
        let b = self.read_exact(address, 8).await?;
        Ok(crate::bytes::le_u64(&b, 0).unwrap_or(0))
    }

    /// Reads a pointer of the target's width; 32-bit pointers are sign-extended like the
    /// kernel's addresses in KD packets.
    async fn read_pointer(&mut self, arch: Arch, address: u64) -> Result<u64, ReadError> {
        match arch {
            Arch::Amd64 => self.read_u64(address).await,
            Arch::X86 => Ok(arch.canonical_address(u64::from(self.read_u32(address).await?))),
        }
    }
}

impl<R: MemoryReader + ?Sized> MemoryReaderExt for R {}

/// The size of a page on both supported architectures.
pub const PAGE_SIZE: u64 = 0x1000;

/// The largest payload one KD ReadVirtualMemory reply carries (PACKET_MAX_SIZE 4000 minus the
/// 56-byte DBGKD_MANIPULATE_STATE64 header).
pub const KD_MAX_READ: usize = 3944;
