//! What the CLI's capture tests share.

use kdpilot_sim::Machine;

const LEAK: u32 = u32::from_le_bytes(*b"Leak");

/// The target as a capture must leave it ([`Machine::leftovers`]): running, no int3 planted, no
/// hardware breakpoint enabled on any processor, nt!PoolHitTag no longer holding the tag.
pub fn check_clean(machine: &Machine) {
    let left = machine.leftovers(LEAK);
    assert!(
        left.is_empty(),
        "the capture left the target unclean: {left:?}"
    );
}
