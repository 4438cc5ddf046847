//! `_NT_SYMBOL_PATH` / `--symbols` in WinDbg syntax: `;`-separated entries, each
//! `srv*[CACHE*...]URL`, `symsrv*DLL*...`, `cache*DIR` or a plain directory.

use std::fmt;
use std::path::PathBuf;

/// Microsoft's public symbol server, used for a bare `srv*` as WinDbg does.
pub const MICROSOFT_SYMBOL_SERVER: &str = "https://msdl.microsoft.com/download/symbols";

/// One entry of a symbol path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SymbolPathEntry {
    /// `cache*DIR`: later entries' finds are copied here. `None` is the default downstream store
    /// (`cache*` with nothing after it).
    Cache(Option<PathBuf>),
    /// `srv*CACHE*...*URL`: stores searched in order, then servers; downloads land in the first
    /// store. `None` stands for the default downstream store (`srv**URL`).
    Server {
        /// Stores, bottom (uncompressed) first.
        stores: Vec<Option<PathBuf>>,
        /// http(s) servers.
        urls: Vec<String>,
    },
    /// A plain directory: searched as a store (`name/KEY/name`) and flat (`name`).
    Directory(PathBuf),
}

/// Why a symbol path was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SymbolPathError {
    /// Nothing usable in it.
    #[error(
        "the symbol path {0:?} has no entries; use e.g. srv*C:\\symbols*{MICROSOFT_SYMBOL_SERVER}"
    )]
    Empty(String),
    /// An entry that cannot be understood.
    #[error("symbol path entry {entry:?}: {reason}")]
    BadEntry {
        /// The entry.
        entry: String,
        /// Why.
        reason: &'static str,
    },
}

/// A parsed symbol path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymbolPath {
    text: String,
    entries: Vec<SymbolPathEntry>,
}

impl SymbolPath {
    /// Parses WinDbg syntax. Whitespace around entries and parts is ignored, empty entries are
    /// skipped, keywords are case-insensitive.
    pub fn parse(text: &str) -> Result<Self, SymbolPathError> {
        let mut entries = Vec::new();
        for raw in text.split(';') {
            let seg = raw.trim();
            if seg.is_empty() {
                continue;
            }
            let parts: Vec<&str> = seg.split('*').map(str::trim).collect();
            let keyword = parts[0].to_ascii_lowercase();
            let bad = |reason| SymbolPathError::BadEntry {
                entry: seg.to_string(),
                reason,
            };
            match keyword.as_str() {
                "cache" if parts.len() <= 2 => {
                    let dir = parts.get(1).filter(|p| !p.is_empty()).map(PathBuf::from);
                    entries.push(SymbolPathEntry::Cache(dir));
                }
                "cache" => return Err(bad("cache takes one directory")),
                "srv" | "symsrv" => {
                    let rest = if keyword == "symsrv" {
                        if parts.len() < 2 || parts[1].is_empty() {
                            return Err(bad("symsrv needs a DLL name"));
                        }
                        &parts[2..]
                    } else {
                        &parts[1..]
                    };
                    let mut stores = Vec::new();
                    let mut urls = Vec::new();
                    for p in rest {
                        let lower = p.to_ascii_lowercase();
                        if lower.starts_with("http://") || lower.starts_with("https://") {
                            urls.push(p.to_string());
                        } else if !urls.is_empty() {
                            return Err(bad("a store after a server URL"));
                        } else if p.is_empty() {
                            stores.push(None);
                        } else {
                            stores.push(Some(PathBuf::from(p)));
                        }
                    }
                    if rest.iter().all(|p| p.is_empty()) {
                        // Bare `srv*`: default store, Microsoft's server.
                        stores = vec![None];
                        urls = vec![MICROSOFT_SYMBOL_SERVER.to_string()];
                    }
                    entries.push(SymbolPathEntry::Server { stores, urls });
                }
                _ if parts.len() > 1 => return Err(bad("unknown keyword before '*'")),
                _ => {
                    let lower = seg.to_ascii_lowercase();
                    if lower.starts_with("http://") || lower.starts_with("https://") {
                        return Err(bad("a server URL needs srv* in front of it"));
                    }
                    entries.push(SymbolPathEntry::Directory(PathBuf::from(seg)));
                }
            }
        }
        if entries.is_empty() {
            return Err(SymbolPathError::Empty(text.to_string()));
        }
        Ok(SymbolPath {
            text: text.trim().to_string(),
            entries,
        })
    }

    /// `_NT_SYMBOL_PATH` from the environment, if set (and `_NT_ALT_SYMBOL_PATH` in front of it,
    /// as dbghelp does).
    pub fn from_environment() -> Option<Result<Self, SymbolPathError>> {
        let main = std::env::var("_NT_SYMBOL_PATH").ok();
        let alt = std::env::var("_NT_ALT_SYMBOL_PATH").ok();
        let joined = match (alt, main) {
            (None, None) => return None,
            (Some(a), None) => a,
            (None, Some(m)) => m,
            (Some(a), Some(m)) => format!("{a};{m}"),
        };
        Some(Self::parse(&joined))
    }

    /// The entries in order.
    pub fn entries(&self) -> &[SymbolPathEntry] {
        &self.entries
    }

    /// The text it was parsed from.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether any entry names a server.
    pub fn has_servers(&self) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(e, SymbolPathEntry::Server { urls, .. } if !urls.is_empty()))
    }

    /// Plain directories, searched flat (`dir/name.pdb`) as well as as stores.
    pub fn directories(&self) -> impl Iterator<Item = &PathBuf> {
        self.entries.iter().filter_map(|e| match e {
            SymbolPathEntry::Directory(d) => Some(d),
            _ => None,
        })
    }

    /// Every server URL, in order.
    pub fn urls(&self) -> impl Iterator<Item = &String> {
        self.entries.iter().flat_map(|e| match e {
            SymbolPathEntry::Server { urls, .. } => urls.as_slice(),
            _ => &[],
        })
    }

    /// The same path without the servers in `skip` (stores and directories stay, so a chain
    /// whose servers are all skipped is still searched as a local store).
    pub fn without_urls(&self, skip: &[String]) -> SymbolPath {
        let entries = self
            .entries
            .iter()
            .map(|e| match e {
                SymbolPathEntry::Server { stores, urls } => SymbolPathEntry::Server {
                    stores: stores.clone(),
                    urls: urls.iter().filter(|u| !skip.contains(u)).cloned().collect(),
                },
                other => other.clone(),
            })
            .collect();
        SymbolPath {
            text: self.text.clone(),
            entries,
        }
    }

    /// The same path in symsrv's terms.
    #[cfg(feature = "store")]
    pub(crate) fn to_symsrv(&self) -> Vec<symsrv::NtSymbolPathEntry> {
        use symsrv::{CachePath, NtSymbolPathEntry as E};
        let cache = |p: &Option<PathBuf>| match p {
            Some(p) => CachePath::Path(p.clone()),
            None => CachePath::DefaultDownstreamStore,
        };
        self.entries
            .iter()
            .map(|e| match e {
                SymbolPathEntry::Cache(Some(d)) => E::Cache(d.clone()),
                // symsrv has no "cache* = default store" form; a chain with only the default
                // store behaves the same for lookups.
                SymbolPathEntry::Cache(None) => E::Chain {
                    dll: "symsrv.dll".into(),
                    cache_paths: vec![CachePath::DefaultDownstreamStore],
                    urls: vec![],
                },
                SymbolPathEntry::Server { stores, urls } => E::Chain {
                    dll: "symsrv.dll".into(),
                    cache_paths: stores.iter().map(cache).collect(),
                    urls: urls.clone(),
                },
                SymbolPathEntry::Directory(d) => E::LocalOrShare(d.clone()),
            })
            .collect()
    }
}

impl fmt::Display for SymbolPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for SymbolPath {
    type Err = SymbolPathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<SymbolPathEntry> {
        SymbolPath::parse(s).unwrap().entries().to_vec()
    }

    #[test]
    fn windbg_forms() {
        assert_eq!(
            p("srv*C:\\symbols*https://msdl.microsoft.com/download/symbols"),
            vec![SymbolPathEntry::Server {
                stores: vec![Some("C:\\symbols".into())],
                urls: vec![MICROSOFT_SYMBOL_SERVER.into()],
            }]
        );
        assert_eq!(
            p("SRV**http://127.0.0.1:1/"),
            vec![SymbolPathEntry::Server {
                stores: vec![None],
                urls: vec!["http://127.0.0.1:1/".into()],
            }]
        );
        assert_eq!(
            p(" cache*/tmp/c ; /builds/out ;; srv*/local/store "),
            vec![
                SymbolPathEntry::Cache(Some("/tmp/c".into())),
                SymbolPathEntry::Directory("/builds/out".into()),
                SymbolPathEntry::Server {
                    stores: vec![Some("/local/store".into())],
                    urls: vec![],
                },
            ]
        );
        assert_eq!(
            p("srv*"),
            vec![SymbolPathEntry::Server {
                stores: vec![None],
                urls: vec![MICROSOFT_SYMBOL_SERVER.into()],
            }]
        );
        assert_eq!(
            p("symsrv*symsrv.dll*/s*https://a/;cache*"),
            vec![
                SymbolPathEntry::Server {
                    stores: vec![Some("/s".into())],
                    urls: vec!["https://a/".into()],
                },
                SymbolPathEntry::Cache(None),
            ]
        );
        assert!(SymbolPath::parse("srv*/a*http://x/").unwrap().has_servers());
        assert!(!SymbolPath::parse("/a").unwrap().has_servers());
    }

    #[test]
    fn refusals() {
        for bad in [
            "",
            " ; ;",
            "http://x/",
            "foo*bar",
            "srv*http://x/*/late",
            "symsrv*",
            "cache*a*b",
        ] {
            assert!(SymbolPath::parse(bad).is_err(), "{bad:?} accepted");
        }
        let e = SymbolPath::parse("").unwrap_err().to_string();
        assert!(e.contains("srv*"), "{e}");
    }
}
