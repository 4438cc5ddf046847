//! The x86 frame data program evaluator on arbitrary programs and memory.
#![no_main]

use std::collections::HashMap;

use kdpilot_symbols::unwind::postfix::evaluate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let program = String::from_utf8_lossy(data);
    let mut vars: HashMap<String, u32> = [
        ("$esp", 0x1000u32),
        ("$ebp", 0x2000),
        ("$eip", 0x401000),
        (".raSearch", 0x1000),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let _ = evaluate(&program, &mut vars, &mut |a| {
        (a % 3 != 0).then(|| a.wrapping_mul(2654435761))
    });
});
