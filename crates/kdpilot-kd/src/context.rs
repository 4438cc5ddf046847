//! CONTEXT structures (kd-protocol.md 2.6).

/// Size of the AMD64 CONTEXT.
pub const AMD64_CONTEXT_SIZE: usize = 1232;
/// Size of the x86 CONTEXT.
pub const X86_CONTEXT_SIZE: usize = 716;
