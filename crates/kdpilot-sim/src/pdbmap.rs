//! The simulator's own view of an image's PDB: where each function and global variable is.
//!
//! The workload needs names to build call paths ("leakydrv!LeakyAllocPushes calls
//! nt!ExAllocatePoolWithTag"); the images are the simulator's own fixtures, so their PDBs are
//! trusted here. (kdpilot's symbol code, which must not trust PDBs, lives elsewhere.)

use std::collections::BTreeMap;
use std::io::Cursor;

use pdb2::FallibleIterator;

/// Functions and data of one image, by undecorated name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PdbMap {
    /// Function name -> (RVA, length in bytes; 0 when only a public symbol gives it).
    pub functions: BTreeMap<String, (u32, u32)>,
    /// Global variable name -> RVA.
    pub data: BTreeMap<String, u32>,
}

/// A PDB could not be read.
#[derive(Debug, thiserror::Error)]
#[error("unreadable PDB: {0}")]
pub struct PdbMapError(String);

impl PdbMap {
    /// Reads procedures, publics and global data from PDB bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, PdbMapError> {
        let err = |e: pdb2::Error| PdbMapError(e.to_string());
        let mut pdb = pdb2::PDB::open(Cursor::new(bytes)).map_err(err)?;
        let map = pdb.address_map().map_err(err)?;
        let mut out = PdbMap::default();
        // Publics without a code flag (assembly labels) are functions unless a data record
        // names them; decided after every stream was read.
        let mut plain_publics: Vec<(String, u32)> = Vec::new();
        let globals = pdb.global_symbols().map_err(err)?;
        let mut it = globals.iter();
        while let Some(sym) = it.next().map_err(err)? {
            match sym.parse() {
                Ok(pdb2::SymbolData::Public(p)) => {
                    if let Some(rva) = p.offset.to_rva(&map) {
                        let name = undecorate(&p.name.to_string());
                        if p.function || p.code {
                            out.functions.entry(name).or_insert((rva.0, 0));
                        } else {
                            plain_publics.push((name, rva.0));
                        }
                    }
                }
                Ok(pdb2::SymbolData::Data(d)) => {
                    if let Some(rva) = d.offset.to_rva(&map) {
                        out.data.insert(undecorate(&d.name.to_string()), rva.0);
                    }
                }
                _ => {}
            }
        }
        let dbi = pdb.debug_information().map_err(err)?;
        let mut modules = dbi.modules().map_err(err)?;
        while let Some(module) = modules.next().map_err(err)? {
            let Some(info) = pdb.module_info(&module).map_err(err)? else {
                continue;
            };
            let mut syms = info.symbols().map_err(err)?;
            while let Some(sym) = syms.next().map_err(err)? {
                match sym.parse() {
                    Ok(pdb2::SymbolData::Procedure(p)) => {
                        if let Some(rva) = p.offset.to_rva(&map) {
                            out.functions
                                .insert(undecorate(&p.name.to_string()), (rva.0, p.len));
                        }
                    }
                    Ok(pdb2::SymbolData::Data(d)) => {
                        if let Some(rva) = d.offset.to_rva(&map) {
                            out.data
                                .entry(undecorate(&d.name.to_string()))
                                .or_insert(rva.0);
                        }
                    }
                    _ => {}
                }
            }
        }
        for (name, rva) in plain_publics {
            if !out.data.contains_key(&name) {
                out.functions.entry(name).or_insert((rva, 0));
            }
        }
        // Functions known only from publics get the distance to the next symbol as length.
        let starts: Vec<u32> = out
            .functions
            .values()
            .map(|(r, _)| *r)
            .chain(out.data.values().copied())
            .collect();
        for (rva, len) in out.functions.values_mut() {
            if *len == 0 {
                let next = starts
                    .iter()
                    .copied()
                    .filter(|s| *s > *rva)
                    .min()
                    .unwrap_or(*rva + 0x100);
                *len = (next - *rva).min(0x1000);
            }
        }
        Ok(out)
    }

    /// RVA and length of a function.
    pub fn function(&self, name: &str) -> Option<(u32, u32)> {
        self.functions.get(name).copied()
    }

    /// The function containing `rva`, with the offset into it.
    pub fn function_at(&self, rva: u32) -> Option<(&str, u32)> {
        self.functions
            .iter()
            .filter(|(_, (start, len))| rva >= *start && rva < start + len)
            .max_by_key(|(_, (start, _))| *start)
            .map(|(name, (start, _))| (name.as_str(), rva - start))
    }
}

/// `_Name@12` -> `Name`, `@Name@8` -> `Name`, `_Name` -> `Name` (x86 decoration); other names
/// unchanged.
pub fn undecorate(name: &str) -> String {
    let body = name
        .strip_prefix('_')
        .or_else(|| name.strip_prefix('@'))
        .unwrap_or(name);
    let body = match body.rsplit_once('@') {
        Some((n, digits)) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => body,
    };
    if name.starts_with('_') || name.starts_with('@') || body.len() != name.len() {
        body.to_string()
    } else {
        name.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::undecorate;

    #[test]
    fn x86_decoration_is_removed() {
        assert_eq!(
            undecorate("_ExAllocatePoolWithTag@12"),
            "ExAllocatePoolWithTag"
        );
        assert_eq!(undecorate("@KfRaiseIrql@4"), "KfRaiseIrql");
        assert_eq!(undecorate("_PoolHitTag"), "PoolHitTag");
        assert_eq!(undecorate("ExAllocatePool2"), "ExAllocatePool2");
    }
}
