//! Prints what the simulator sees in a PDB: `cargo run -p kdpilot-sim --example pdbmap_dump -- FILE.pdb`.
fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: pdbmap_dump FILE.pdb");
        std::process::exit(2);
    };
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let map = kdpilot_sim::pdbmap::PdbMap::parse(&bytes).unwrap_or_else(|e| panic!("{path}: {e}"));
    for (name, (rva, len)) in &map.functions {
        println!("fn   {rva:#010x} {len:#6x} {name}");
    }
    for (name, rva) in &map.data {
        println!("data {rva:#010x}        {name}");
    }
}
