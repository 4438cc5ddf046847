//! The store lookups symsrv 0.5 refuses: it knows only the `.exe`, `.dll`, `.pdb` and `.dbg`
//! extensions (lower case), so drivers (`leakydrv.sys`, `CLASSPNP.SYS`) come through here.
//! Same layout (`name/KEY/name`, compressed `name/KEY/nam_`), same symbol path semantics
//! (stores in order; downloads land in the chain's first store, or the first `cache*`, or the
//! default downstream store); files are written to a temporary name and renamed, so a
//! cancelled download never leaves a half file where WinDbg would take it for the real one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{Observer, ProgressEvent};
use crate::symbol_path::{SymbolPath, SymbolPathEntry};

/// Download ids of this fetcher start here, apart from symsrv's.
static NEXT_ID: AtomicU64 = AtomicU64::new(1 << 40);
static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// The biggest file accepted (a full ntkrnlmp.pdb is about 30 MB).
const MAX_FILE: u64 = 1 << 30;

pub(crate) enum FetchError {
    NotFound,
    Failed(String),
}

pub(crate) struct Fetcher {
    client: Result<reqwest::Client, String>,
}

use super::health::compressed_name;

fn temp_next_to(dest: &Path) -> PathBuf {
    let n = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
    let mut name = dest
        .file_name()
        .map(|s| s.to_os_string())
        .unwrap_or_default();
    name.push(format!(".kdpilot-partial-{}-{n}", std::process::id()));
    dest.with_file_name(name)
}

/// Extracts the single file of a CAB into `dest` (blocking).
fn extract_cab(cab_path: &Path, dest: &Path) -> Result<(), String> {
    let file = std::fs::File::open(cab_path).map_err(|e| e.to_string())?;
    let mut cabinet =
        cab::Cabinet::new(std::io::BufReader::new(file)).map_err(|e| e.to_string())?;
    let name = cabinet
        .folder_entries()
        .flat_map(|f| f.file_entries())
        .map(|e| e.name().to_string())
        .next()
        .ok_or("empty CAB")?;
    let mut reader = cabinet.read_file(&name).map_err(|e| e.to_string())?;
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let tmp = temp_next_to(dest);
    let result = (|| {
        let mut out = std::fs::File::create(&tmp)?;
        let n = std::io::copy(&mut (&mut reader).take(MAX_FILE), &mut out)?;
        out.flush()?;
        drop(out);
        if n == 0 {
            return Err(std::io::Error::other("empty file in CAB"));
        }
        std::fs::rename(&tmp, dest)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| e.to_string())
}

use std::io::Read;

impl Fetcher {
    pub fn new(connect_timeout: Duration, read_timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .http1_only()
            .connect_timeout(connect_timeout)
            .read_timeout(read_timeout)
            .no_gzip()
            .build()
            .map_err(|e| e.to_string());
        Fetcher { client }
    }

    /// Looks for `name/key/name` along `path`.
    pub async fn get(
        &self,
        path: &SymbolPath,
        default_store: Option<&Path>,
        offline: bool,
        name: &str,
        key: &str,
        observer: &Observer,
    ) -> Result<PathBuf, FetchError> {
        let rel = Path::new(name).join(key).join(name);
        let cname = compressed_name(name);
        let rel_c = Path::new(name).join(key).join(&cname);
        let mut caches: Vec<PathBuf> = Vec::new();
        let resolve = |p: &Option<PathBuf>| -> Option<PathBuf> {
            p.clone().or_else(|| default_store.map(Path::to_path_buf))
        };
        for entry in path.entries() {
            match entry {
                SymbolPathEntry::Cache(d) => {
                    let Some(d) = resolve(d) else { continue };
                    if let Some(p) = self
                        .check(&d, &rel, &rel_c, caches.first().map(PathBuf::as_path))
                        .await?
                    {
                        return Ok(p);
                    }
                    caches.push(d);
                }
                SymbolPathEntry::Directory(d) => {
                    if let Some(p) = self
                        .check(d, &rel, &rel_c, caches.first().map(PathBuf::as_path))
                        .await?
                    {
                        return Ok(p);
                    }
                }
                SymbolPathEntry::Server { stores, urls } => {
                    let stores: Vec<PathBuf> = stores.iter().filter_map(resolve).collect();
                    for s in &stores {
                        let extract_to = caches.first().or(stores.first()).map(PathBuf::as_path);
                        if let Some(p) = self.check(s, &rel, &rel_c, extract_to).await? {
                            return Ok(p);
                        }
                    }
                    if offline || urls.is_empty() {
                        continue;
                    }
                    let Some(dest_root) = stores
                        .first()
                        .or(caches.first())
                        .cloned()
                        .or_else(|| default_store.map(Path::to_path_buf))
                    else {
                        return Err(FetchError::Failed(
                            "no store to download into: give one, as in srv*C:\\symbols*URL".into(),
                        ));
                    };
                    let dest = dest_root.join(&rel);
                    for url in urls {
                        let base = url.trim_end_matches('/');
                        let plain = format!("{base}/{name}/{key}/{name}");
                        if self.download(&plain, &dest, observer).await? {
                            return Ok(dest);
                        }
                        let compressed = format!("{base}/{name}/{key}/{cname}");
                        let cab_dest = dest_root.join(&rel_c);
                        if self.download(&compressed, &cab_dest, observer).await? {
                            observer.emit(ProgressEvent::Extracting { path: dest.clone() });
                            let (c, d) = (cab_dest.clone(), dest.clone());
                            let r = tokio::task::spawn_blocking(move || extract_cab(&c, &d))
                                .await
                                .map_err(|e| FetchError::Failed(e.to_string()))?;
                            r.map_err(|e| {
                                FetchError::Failed(format!("{}: {e}", cab_dest.display()))
                            })?;
                            observer.note_created(&dest);
                            return Ok(dest);
                        }
                    }
                }
            }
        }
        Err(FetchError::NotFound)
    }

    /// `dir/rel`, or `dir/rel_c` extracted into `extract_root` (or next to it).
    async fn check(
        &self,
        dir: &Path,
        rel: &Path,
        rel_c: &Path,
        extract_root: Option<&Path>,
    ) -> Result<Option<PathBuf>, FetchError> {
        let plain = dir.join(rel);
        if plain.is_file() {
            return Ok(Some(plain));
        }
        let compressed = dir.join(rel_c);
        if compressed.is_file() {
            let dest = extract_root.unwrap_or(dir).join(rel);
            let d = dest.clone();
            tokio::task::spawn_blocking(move || extract_cab(&compressed, &d))
                .await
                .map_err(|e| FetchError::Failed(e.to_string()))?
                .map_err(FetchError::Failed)?;
            return Ok(Some(dest));
        }
        Ok(None)
    }

    /// Downloads `url` to `dest`. `Ok(false)` when the server does not have it.
    async fn download(
        &self,
        url: &str,
        dest: &Path,
        observer: &Observer,
    ) -> Result<bool, FetchError> {
        let client = self
            .client
            .as_ref()
            .map_err(|e| FetchError::Failed(e.clone()))?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        observer.note_start(id, url);
        let fail = |reason: String| {
            observer.note_failure(id, url, &reason);
            FetchError::Failed(format!("{url}: {reason}"))
        };
        let mut response = match client.get(url).send().await {
            Ok(r) => r,
            Err(e) => {
                observer.note_failure(id, url, &e.to_string());
                return Ok(false);
            }
        };
        if !response.status().is_success() {
            observer.note_failure(id, url, &format!("HTTP {}", response.status()));
            return Ok(false);
        }
        let total = response.content_length();
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        }
        let tmp = temp_next_to(dest);
        let mut file = std::fs::File::create(&tmp).map_err(|e| fail(e.to_string()))?;
        // Removes the partial file if this future is dropped (a timeout) before the rename.
        struct Partial<'a>(&'a Path, bool);
        impl Drop for Partial<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    let _ = std::fs::remove_file(self.0);
                }
            }
        }
        let mut partial = Partial(&tmp, false);
        let mut bytes = 0u64;
        let result: Result<(), String> = async {
            while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
                bytes += chunk.len() as u64;
                if bytes > MAX_FILE {
                    return Err("file too large".into());
                }
                file.write_all(&chunk).map_err(|e| e.to_string())?;
                observer.emit_progress(id, bytes, total);
            }
            file.flush().map_err(|e| e.to_string())?;
            Ok(())
        }
        .await;
        drop(file);
        match result.and_then(|()| std::fs::rename(&tmp, dest).map_err(|e| e.to_string())) {
            Ok(()) => {
                partial.1 = true;
                observer.note_created(dest);
                observer.emit(ProgressEvent::DownloadFinished {
                    id,
                    bytes,
                    elapsed: start.elapsed(),
                });
                Ok(true)
            }
            Err(e) => Err(fail(e)),
        }
    }
}
