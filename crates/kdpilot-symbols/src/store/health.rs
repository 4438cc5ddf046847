//! What a [`super::SymbolStore`] remembers about trouble between lookups, so that a night of
//! reboots does not pay for a bad symbol server again at every boot and every module:
//!
//! - **servers that failed** (unreachable, an error status, a download that stalled or
//!   trickled): not asked again for [`super::StoreOptions::server_cooldown`]; lookups meanwhile
//!   search the local stores only, and their messages say which server is skipped and why;
//! - **files that could not be had** (not on any server, refused, timed out): not downloaded
//!   again for the same time (the local stores are still searched, so a file put into the cache
//!   by hand is found at once);
//! - **partial downloads**: a lookup cut off by the watchdog leaves symsrv's `NAME.part` (and
//!   its `NAME.lock`) in the cache; they are removed, so the cache holds only whole files.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::StoreError;
use crate::symbol_path::{SymbolPath, SymbolPathEntry};

/// A server taken out of lookups for a while.
#[derive(Clone, Debug)]
pub(crate) struct Down {
    /// Until when.
    pub until: Instant,
    /// What happened, for messages.
    pub why: String,
}

#[derive(Debug, Default)]
pub(crate) struct Health {
    down: BTreeMap<String, Down>,
    failed: HashMap<(String, String), (Instant, StoreError)>,
}

impl Health {
    /// Servers that are down now (expired entries are dropped).
    pub fn down_now(&mut self, now: Instant) -> Vec<(String, Down)> {
        self.down.retain(|_, d| d.until > now);
        self.down
            .iter()
            .map(|(u, d)| (u.clone(), d.clone()))
            .collect()
    }

    /// Takes `url` out of lookups until `now + cooldown`.
    pub fn mark_down(&mut self, url: &str, why: String, now: Instant, cooldown: Duration) {
        tracing::warn!(url, %why, "symbol server skipped for {cooldown:?}");
        self.down.insert(
            url.to_string(),
            Down {
                until: now + cooldown,
                why,
            },
        );
    }

    /// The failure remembered for `name/key`, if still fresh.
    pub fn failure(&mut self, name: &str, key: &str, now: Instant) -> Option<StoreError> {
        let k = (name.to_string(), key.to_string());
        match self.failed.get(&k) {
            Some((until, e)) if *until > now => Some(e.clone()),
            Some(_) => {
                self.failed.remove(&k);
                None
            }
            None => None,
        }
    }

    /// Remembers that `name/key` could not be had.
    pub fn remember(&mut self, name: &str, key: &str, e: &StoreError, until: Instant) {
        // Bounded: a night sees a few hundred modules at most; drop the stale ones first.
        if self.failed.len() >= 4096 {
            let now = Instant::now();
            self.failed.retain(|_, (u, _)| *u > now);
            if self.failed.len() >= 4096 {
                self.failed.clear();
            }
        }
        self.failed
            .insert((name.to_string(), key.to_string()), (until, e.clone()));
    }
}

/// The server of the symbol path that `url` (a file's URL) was asked from.
pub(crate) fn server_of<'a>(path: &'a SymbolPath, url: &str) -> Option<&'a String> {
    path.urls()
        .filter(|s| url.starts_with(s.trim_end_matches('/')))
        .max_by_key(|s| s.len())
}

/// The stores downloads may land in: every `cache*` directory and every `srv*` store.
pub(crate) fn download_roots(path: &SymbolPath, default_store: Option<&Path>) -> Vec<PathBuf> {
    let resolve = |p: &Option<PathBuf>| p.clone().or_else(|| default_store.map(Path::to_path_buf));
    let mut roots = Vec::new();
    for e in path.entries() {
        match e {
            SymbolPathEntry::Cache(d) => roots.extend(resolve(d)),
            SymbolPathEntry::Server { stores, .. } => {
                roots.extend(stores.iter().filter_map(resolve))
            }
            SymbolPathEntry::Directory(_) => {}
        }
    }
    roots.dedup();
    roots
}

/// `name` with its last character replaced by `_` (`ntkrnlmp.pdb` -> `ntkrnlmp.pd_`).
pub(crate) fn compressed_name(name: &str) -> String {
    let mut s = name.to_string();
    s.pop();
    s.push('_');
    s
}

/// Removes what a failed or interrupted download of `name/key` left in the stores under
/// `roots`: symsrv's `NAME.part` and `NAME.lock` (plain and compressed names; symsrv keeps lock
/// files after a failure, and a download cut off by the watchdog keeps its `.part` too). Files
/// whose lock another process holds are being written by that process, and are left alone.
/// Returns the files removed.
pub(crate) fn remove_partials(roots: &[PathBuf], name: &str, key: &str) -> Vec<PathBuf> {
    use fs4::fs_std::FileExt as _;
    let mut removed = Vec::new();
    for root in roots {
        let dir = root.join(name).join(key);
        for file in [name.to_string(), compressed_name(name)] {
            let part = dir.join(format!("{file}.part"));
            let lock = dir.join(format!("{file}.lock"));
            let held = match std::fs::OpenOptions::new().write(true).open(&lock) {
                Ok(f) => match f.try_lock_exclusive() {
                    Ok(true) => Some(f),
                    _ => continue, // someone is writing it
                },
                Err(_) => None,
            };
            if std::fs::remove_file(&part).is_ok() {
                removed.push(part);
            }
            if let Some(f) = held {
                drop(f);
                if std::fs::remove_file(&lock).is_ok() {
                    removed.push(lock);
                }
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_are_matched_by_prefix_and_stores_listed() {
        let p =
            SymbolPath::parse("cache*/c;srv*/a*/b*http://127.0.0.1:1/x*http://127.0.0.1:1/;/flat")
                .unwrap();
        assert_eq!(
            server_of(&p, "http://127.0.0.1:1/x/a.pdb/K/a.pdb").map(String::as_str),
            Some("http://127.0.0.1:1/x")
        );
        assert_eq!(
            server_of(&p, "http://127.0.0.1:1/a.pdb/K/a.pdb").map(String::as_str),
            Some("http://127.0.0.1:1/")
        );
        assert_eq!(server_of(&p, "http://elsewhere/a.pdb"), None);
        assert_eq!(
            download_roots(&p, None),
            vec![
                PathBuf::from("/c"),
                PathBuf::from("/a"),
                PathBuf::from("/b")
            ]
        );
        let fewer = p.without_urls(&["http://127.0.0.1:1/x".to_string()]);
        assert_eq!(fewer.urls().count(), 1);
        assert!(fewer.has_servers());
        assert!(!p
            .without_urls(&p.urls().cloned().collect::<Vec<_>>())
            .has_servers());
    }

    #[test]
    fn partial_downloads_are_removed_unless_someone_holds_the_lock() {
        use fs4::fs_std::FileExt as _;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a.pdb").join("KEY");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.pdb.part"), b"MSF half").unwrap();
        std::fs::write(dir.join("a.pdb.lock"), b"").unwrap();
        std::fs::write(dir.join("a.pd_.part"), b"MSCF half").unwrap();
        let other = std::fs::File::create(dir.join("a.pd_.lock")).unwrap();
        assert!(other.try_lock_exclusive().unwrap());
        let removed = remove_partials(&[root.path().to_path_buf()], "a.pdb", "KEY");
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!dir.join("a.pdb.part").exists() && !dir.join("a.pdb.lock").exists());
        assert!(
            dir.join("a.pd_.part").exists(),
            "another writer's file is kept"
        );
        drop(other);
        assert_eq!(
            remove_partials(&[root.path().to_path_buf()], "a.pdb", "KEY").len(),
            2
        );
    }

    #[test]
    fn failures_and_down_servers_expire() {
        let mut h = Health::default();
        let now = Instant::now();
        h.mark_down("http://s/", "refused".into(), now, Duration::from_secs(60));
        assert_eq!(h.down_now(now).len(), 1);
        assert!(h.down_now(now + Duration::from_secs(61)).is_empty());
        let e = StoreError::Store {
            file: "a.pdb".into(),
            detail: "x".into(),
        };
        h.remember("a.pdb", "K", &e, now + Duration::from_secs(5));
        assert!(h.failure("a.pdb", "K", now).is_some());
        assert!(h.failure("a.pdb", "K2", now).is_none());
        assert!(h
            .failure("a.pdb", "K", now + Duration::from_secs(6))
            .is_none());
    }
}
