//! What the CLI's capture tests share.

use kdpilot_sim::Machine;

const LEAK: u32 = u32::from_le_bytes(*b"Leak");

/// The target as a capture must leave it: running, no int3 planted, no hardware breakpoint
/// enabled on any processor, nt!PoolHitTag no longer holding the tag.
pub fn check_clean(machine: &Machine) {
    assert!(
        machine.running,
        "the target was left stopped: {:?}",
        machine.phase
    );
    assert!(
        machine.planted().is_empty(),
        "a breakpoint was left planted"
    );
    for cpu in 0..machine.processors as u16 {
        let dr7 = machine.debug_registers(cpu).unwrap().dr7;
        assert_eq!(
            dr7 & 0xff,
            0,
            "a hardware breakpoint left enabled on CPU {cpu}"
        );
    }
    assert_ne!(
        machine.pool_hit_tag(),
        Some(LEAK),
        "nt!PoolHitTag left holding the tag"
    );
}
