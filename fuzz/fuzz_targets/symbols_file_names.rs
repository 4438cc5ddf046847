//! Names that come from the target and become paths in a symbol store: CodeView records (the
//! PDB path of an image in target memory), module and LoadSymbols names. Whatever the bytes,
//! a name that is accepted is one safe path component: no separator, drive or stream colon,
//! NUL or control character, no `.`/`..`, no Windows device name, bounded in length; the store
//! path built from it stays under the store; the WinDbg module name is a plain identifier.
#![no_main]

use std::path::{Component, Path};

use kdpilot_symbols::ids::MAX_FILE_NAME_LEN;
use kdpilot_symbols::modules::windbg_module_name;
use kdpilot_symbols::pe::CodeViewInfo;
use kdpilot_symbols::sanitize_file_name;
use libfuzzer_sys::fuzz_target;

fn check(name: &str) {
    assert!(!name.is_empty() && name.len() <= MAX_FILE_NAME_LEN, "{name:?}");
    assert!(
        !name.contains(['/', '\\', ':', '\0', '*', '?', '"', '<', '>', '|']),
        "{name:?}"
    );
    assert!(!name.chars().any(char::is_control), "{name:?}");
    assert!(name != "." && name != "..", "{name:?}");
    let stem = name.split('.').next().unwrap_or(name).to_ascii_uppercase();
    assert!(
        !matches!(stem.as_str(), "CON" | "PRN" | "AUX" | "NUL")
            && !(stem.len() == 4
                && (stem.starts_with("COM") || stem.starts_with("LPT"))
                && stem.as_bytes()[3].is_ascii_digit()),
        "{name:?} is a Windows device"
    );
    let store = Path::new("/store");
    let p = store.join(name).join("0123456789ABCDEF1").join(name);
    assert!(p.starts_with(store));
    assert_eq!(
        p.components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .count(),
        4,
        "{p:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    if let Some(cv) = CodeViewInfo::parse(data) {
        assert!(cv.pdb_path.len() <= 4 * data.len() + 4);
        if let Ok(id) = cv.pdb_id() {
            check(&id.name);
            let key = id.store_key();
            assert!(key.bytes().all(|b| b.is_ascii_hexdigit()), "{key}");
        }
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(name) = sanitize_file_name(&text) {
        check(&name);
    }
    for kernel in [false, true] {
        let m = windbg_module_name(&text, kernel);
        assert!(!m.is_empty());
        assert!(m.chars().all(|c| c.is_alphanumeric() || c == '_'), "{m:?}");
    }
});
