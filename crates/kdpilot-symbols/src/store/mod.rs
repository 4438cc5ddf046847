//! Finding PDBs and image files: local stores, flat directories and symbol servers (through
//! symsrv: HTTP, CAB-compressed `.pd_`, the standard `name/KEY/name` cache layout WinDbg
//! shares). Every file is checked against the identity the target's memory gave before use.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ids::{ImageId, PdbId};
use crate::module_set::{Module, SymbolStatus};
use crate::pdb::{ModuleSymbols, PdbError};
use crate::pe::PeFile;
use crate::symbol_path::{SymbolPath, MICROSOFT_SYMBOL_SERVER};

mod fetch;
mod health;

/// Something a lookup did, for the caller's progress display.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProgressEvent {
    /// A file is being looked for.
    Lookup {
        /// File name.
        file: String,
        /// Store key.
        key: String,
    },
    /// A download is starting (before connecting).
    DownloadStarted {
        /// Download id (unique per download).
        id: u64,
        /// URL.
        url: String,
    },
    /// Bytes arrived.
    DownloadProgress {
        /// Download id.
        id: u64,
        /// Bytes so far.
        bytes: u64,
        /// Total, if the server said.
        total: Option<u64>,
    },
    /// A download finished.
    DownloadFinished {
        /// Download id.
        id: u64,
        /// Bytes.
        bytes: u64,
        /// Time taken.
        elapsed: Duration,
    },
    /// A download failed (404s are normal: a server is asked for `.pdb` and `.pd_`).
    DownloadFailed {
        /// Download id.
        id: u64,
        /// URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// A CAB (`.pd_`) is being extracted.
    Extracting {
        /// Where to.
        path: PathBuf,
    },
    /// A file was found and accepted.
    Found {
        /// File name.
        file: String,
        /// Local path.
        path: PathBuf,
    },
}

/// Receives [`ProgressEvent`]s (the CLI draws bars from them; the library never prints).
pub trait ProgressSink: Send + Sync {
    /// One event. Called from download tasks: keep it quick.
    fn event(&self, event: &ProgressEvent);
}

/// Options of a [`SymbolStore`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Where `srv**URL`, `srv*URL` and `cache*` put files (WinDbg's default downstream store).
    pub default_downstream: Option<PathBuf>,
    /// Only look in local stores and directories: no downloads.
    pub offline: bool,
    /// A download that makes no progress for this long is abandoned.
    pub stall_timeout: Duration,
    /// No single lookup takes longer than this.
    pub total_timeout: Duration,
    /// A download slower than this (bytes per second, measured over `stall_timeout`) is
    /// abandoned like a stalled one: a server that trickles costs one stall window, not the
    /// total limit.
    pub min_rate: u64,
    /// A server that failed (unreachable, an error status, a stalled or trickling download) is
    /// not asked again for this long, and a file that could not be had is not downloaded again
    /// for this long (the local stores are still searched). A night of reboots looks every
    /// module up again at each boot; this keeps a bad server from costing its timeouts each
    /// time.
    pub server_cooldown: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            default_downstream: symsrv::get_home_sym_dir(),
            offline: false,
            stall_timeout: Duration::from_secs(30),
            total_timeout: Duration::from_secs(15 * 60),
            min_rate: 2048,
            server_cooldown: Duration::from_secs(10 * 60),
        }
    }
}

/// Why a file was not had.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// Not in any store, directory or server of the symbol path.
    #[error("{file} ({key}) not found in symbol path {path:?}{detail}; {hint}")]
    NotFound {
        /// File name.
        file: String,
        /// Store key.
        key: String,
        /// The symbol path searched.
        path: String,
        /// Failures other than "not there", if any.
        detail: String,
        /// What to do about it.
        hint: String,
    },
    /// A file was found under the right key but is not the right file.
    #[error("refusing {path}: {detail}", path = .path.display())]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// Both identities.
        detail: String,
    },
    /// The lookup took too long.
    #[error("looking up {file} timed out after {after:?} ({why})")]
    Timeout {
        /// File name.
        file: String,
        /// How long it ran.
        after: Duration,
        /// Stalled, too slow, or over the total limit.
        why: String,
    },
    /// The file was found but could not be read or parsed.
    #[error("cannot use {path}: {detail}", path = .path.display())]
    Unusable {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// symsrv failed in another way (file system, CAB extraction).
    #[error("symbol store error for {file}: {detail}")]
    Store {
        /// File name.
        file: String,
        /// symsrv's message.
        detail: String,
    },
}

#[derive(Default)]
struct ObserverState {
    urls: HashMap<u64, String>,
    failures: Vec<(String, String)>,
    last_activity: Option<Instant>,
    /// Bytes so far of each download in progress, and of all downloads since the window began.
    bytes: HashMap<u64, u64>,
    window: Option<(Instant, u64)>,
    received: u64,
    /// Files symsrv or the fetcher created in a store (downloaded, extracted, copied).
    created: HashSet<PathBuf>,
}

/// symsrv's observer, turned into [`ProgressEvent`]s plus what the watchdog and the error
/// messages need.
struct Observer {
    sink: Option<Arc<dyn ProgressSink>>,
    state: Mutex<ObserverState>,
}

impl Observer {
    fn with_state<T>(&self, f: impl FnOnce(&mut ObserverState) -> T) -> T {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        guard.last_activity = Some(Instant::now());
        f(&mut guard)
    }

    fn emit(&self, e: ProgressEvent) {
        if let Some(s) = &self.sink {
            s.event(&e);
        }
    }

    fn last_activity(&self) -> Option<Instant> {
        match self.state.lock() {
            Ok(g) => g.last_activity,
            Err(p) => p.into_inner().last_activity,
        }
    }

    fn note_start(&self, id: u64, url: &str) {
        self.with_state(|s| s.urls.insert(id, url.to_string()));
        self.emit(ProgressEvent::DownloadStarted {
            id,
            url: url.to_string(),
        });
    }

    fn note_failure(&self, id: u64, url: &str, reason: &str) {
        self.with_state(|s| {
            s.urls.remove(&id);
            s.bytes.remove(&id);
            if !reason.contains("404") {
                s.failures.push((url.to_string(), reason.to_string()));
            }
        });
        self.emit(ProgressEvent::DownloadFailed {
            id,
            url: url.to_string(),
            reason: reason.to_string(),
        });
    }

    fn emit_progress(&self, id: u64, bytes: u64, total: Option<u64>) {
        self.with_state(|s| s.count_bytes(id, bytes));
        self.emit(ProgressEvent::DownloadProgress { id, bytes, total });
    }

    /// A file now in a store that this process put there.
    fn note_created(&self, path: &Path) {
        self.with_state(|s| s.created.insert(path.to_path_buf()));
    }

    /// Forgets and returns the files created for `name/key`.
    fn take_created_for(&self, name: &str, key: &str) -> Vec<PathBuf> {
        let dir = Path::new(name).join(key);
        self.with_state(|s| {
            let mine: Vec<PathBuf> = s
                .created
                .iter()
                .filter(|p| p.parent().is_some_and(|d| d.ends_with(&dir)))
                .cloned()
                .collect();
            for p in &mine {
                s.created.remove(p);
            }
            mine
        })
    }

    /// Whether `path` was created by this process (and forgets it).
    fn take_created(&self, path: &Path) -> bool {
        self.with_state(|s| s.created.remove(path))
    }

    /// A new lookup of the files whose URLs contain `needle`: the throughput window starts
    /// now, and their old failures are forgotten.
    fn begin_lookup(&self, needle: &str) {
        self.with_state(|s| {
            s.window = Some((Instant::now(), s.received));
            s.failures.retain(|(u, _)| !u.contains(needle));
            // Bounded over a night of lookups.
            if s.failures.len() > 1024 {
                s.failures.drain(..512);
            }
            if s.created.len() > 4096 {
                s.created.clear();
            }
        });
    }

    /// Whether downloads are running slower than `min_rate` bytes per second over the last
    /// `window`; starts a new window each time one is complete.
    fn too_slow(&self, window: Duration, min_rate: u64) -> Option<String> {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let now = Instant::now();
        let received = guard.received;
        let (since, at) = *guard.window.get_or_insert((now, received));
        if now.duration_since(since) < window {
            return None;
        }
        let got = guard.received - at;
        let active = !guard.urls.is_empty();
        guard.window = Some((now, guard.received));
        let want = (min_rate as f64 * window.as_secs_f64()) as u64;
        (active && got < want).then(|| {
            format!(
                "{got} bytes in {:.0} s, slower than {min_rate} bytes/s",
                window.as_secs_f64()
            )
        })
    }

    /// URLs of downloads in progress whose URL contains `needle`.
    fn in_flight_for(&self, needle: &str) -> Vec<String> {
        self.with_state(|s| {
            s.urls
                .values()
                .filter(|u| u.contains(needle))
                .cloned()
                .collect()
        })
    }

    /// Failures (URL, reason) whose URL contains `needle`.
    fn failures_for(&self, needle: &str) -> Vec<(String, String)> {
        self.with_state(|s| {
            s.failures
                .iter()
                .filter(|(u, _)| u.contains(needle))
                .cloned()
                .collect()
        })
    }
}

impl symsrv::SymsrvObserver for Observer {
    fn on_new_download_before_connect(&self, id: u64, url: &str) {
        self.with_state(|s| s.urls.insert(id, url.to_string()));
        tracing::debug!(url, "symbol download starting");
        self.emit(ProgressEvent::DownloadStarted {
            id,
            url: url.to_string(),
        });
    }
    fn on_download_started(&self, _id: u64) {
        self.with_state(|_| ());
    }
    fn on_download_progress(&self, id: u64, bytes: u64, total: Option<u64>) {
        self.with_state(|s| s.count_bytes(id, bytes));
        self.emit(ProgressEvent::DownloadProgress { id, bytes, total });
    }
    fn on_download_completed(&self, id: u64, bytes: u64, _headers: Duration, elapsed: Duration) {
        self.with_state(|s| {
            s.urls.remove(&id);
            s.bytes.remove(&id);
        });
        self.emit(ProgressEvent::DownloadFinished { id, bytes, elapsed });
    }
    fn on_download_failed(&self, id: u64, reason: symsrv::DownloadError) {
        let reason = reason.to_string();
        let url = self.with_state(|s| {
            s.bytes.remove(&id);
            let url = s.urls.remove(&id).unwrap_or_default();
            if !reason.contains("404") {
                s.failures.push((url.clone(), reason.clone()));
            }
            url
        });
        tracing::debug!(url, reason, "symbol download failed");
        self.emit(ProgressEvent::DownloadFailed { id, url, reason });
    }
    fn on_download_canceled(&self, id: u64) {
        self.with_state(|s| {
            s.urls.remove(&id);
            s.bytes.remove(&id);
        });
    }
    fn on_new_cab_extraction(&self, _id: u64, dest: &Path) {
        self.with_state(|_| ());
        self.emit(ProgressEvent::Extracting {
            path: dest.to_path_buf(),
        });
    }
    fn on_cab_extraction_progress(&self, _id: u64, _bytes: u64, _total: u64) {
        self.with_state(|_| ());
    }
    fn on_cab_extraction_completed(&self, _id: u64, _bytes: u64, _elapsed: Duration) {
        self.with_state(|_| ());
    }
    fn on_cab_extraction_failed(&self, _id: u64, reason: symsrv::CabExtractionError) {
        let r = reason.to_string();
        self.with_state(|s| s.failures.push(("cab".into(), r)));
    }
    fn on_cab_extraction_canceled(&self, _id: u64) {}
    fn on_file_created(&self, path: &Path, _size: u64) {
        self.note_created(path);
    }
    fn on_file_accessed(&self, _path: &Path) {}
    fn on_file_missed(&self, _path: &Path) {}
}

impl ObserverState {
    fn count_bytes(&mut self, id: u64, bytes: u64) {
        let before = self.bytes.insert(id, bytes).unwrap_or(0);
        self.received += bytes.saturating_sub(before);
    }
}

/// The symbol path as lookups use it now (without the servers that are down), and its
/// downloader.
struct View {
    path: SymbolPath,
    downloader: symsrv::SymsrvDownloader,
    /// The servers left out, and why.
    skipped: Vec<(String, health::Down)>,
}

fn downloader(
    path: &SymbolPath,
    options: &StoreOptions,
    observer: &Arc<Observer>,
) -> symsrv::SymsrvDownloader {
    let mut d = symsrv::SymsrvDownloader::new(path.to_symsrv());
    d.set_default_downstream_store(options.default_downstream.clone());
    d.set_observer(Some(observer.clone()));
    d
}

/// Finds PDBs and images along a [`SymbolPath`].
pub struct SymbolStore {
    path: SymbolPath,
    options: StoreOptions,
    fetcher: fetch::Fetcher,
    observer: Arc<Observer>,
    /// The whole path; and the path without the servers that are down, while some are.
    full: Arc<View>,
    reduced: Mutex<Option<Arc<View>>>,
    health: Mutex<health::Health>,
}

impl std::fmt::Debug for SymbolStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SymbolStore")
            .field("path", &self.path)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// What [`SymbolStore::load_module`] found for one module.
#[derive(Debug)]
pub struct ModuleLoad {
    /// The PDB: its path, or why not.
    pub pdb: Result<PathBuf, StoreError>,
    /// The image file: its path, or why not.
    pub image: Result<PathBuf, StoreError>,
}

impl SymbolStore {
    /// A store searching `path`. Needs a tokio runtime when used (symsrv spawns tasks).
    pub fn new(
        path: SymbolPath,
        options: StoreOptions,
        progress: Option<Arc<dyn ProgressSink>>,
    ) -> Self {
        let observer = Arc::new(Observer {
            sink: progress,
            state: Mutex::new(ObserverState::default()),
        });
        let full = Arc::new(View {
            downloader: downloader(&path, &options, &observer),
            path: path.clone(),
            skipped: Vec::new(),
        });
        let fetcher = fetch::Fetcher::new(
            options.stall_timeout.min(Duration::from_secs(30)),
            options.stall_timeout,
        );
        SymbolStore {
            path,
            options,
            fetcher,
            observer,
            full,
            reduced: Mutex::new(None),
            health: Mutex::new(health::Health::default()),
        }
    }

    /// The symbol path.
    pub fn path(&self) -> &SymbolPath {
        &self.path
    }

    /// The options.
    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// Finds, checks and parses the PDB `id`.
    pub async fn find_pdb(&self, id: &PdbId) -> Result<(PathBuf, ModuleSymbols), StoreError> {
        let key = id.store_key();
        self.observer.emit(ProgressEvent::Lookup {
            file: id.name.clone(),
            key: key.clone(),
        });
        // Flat directories first, accepting only a matching file.
        let mut flat_mismatch = None;
        for dir in self.path.directories() {
            let candidate = dir.join(&id.name);
            if !candidate.is_file() {
                continue;
            }
            match load_pdb(candidate.clone(), id.clone()).await {
                Ok(s) => {
                    self.found(&id.name, &candidate);
                    return Ok((candidate, s));
                }
                Err(e @ StoreError::Mismatch { .. }) => flat_mismatch = Some(e),
                Err(e) => tracing::debug!(error = %e, "skipping a flat-directory PDB"),
            }
        }
        let path = match self.fetch(&id.name, &key).await {
            Ok(p) => p,
            Err(e @ StoreError::NotFound { .. }) => return Err(flat_mismatch.unwrap_or(e)),
            Err(e) => return Err(e),
        };
        let symbols = match load_pdb(path.clone(), id.clone()).await {
            Ok(s) => s,
            Err(e) => return Err(self.refuse(&id.name, &key, &path, e)),
        };
        self.found(&id.name, &path);
        Ok((path, symbols))
    }

    /// Finds and checks the image file `id`.
    pub async fn find_image(&self, id: &ImageId) -> Result<(PathBuf, PeFile), StoreError> {
        let key = id.store_key();
        self.observer.emit(ProgressEvent::Lookup {
            file: id.name.clone(),
            key: key.clone(),
        });
        for dir in self.path.directories() {
            let candidate = dir.join(&id.name);
            if candidate.is_file() {
                if let Ok(image) = load_image(&candidate, id).await {
                    self.found(&id.name, &candidate);
                    return Ok((candidate, image));
                }
            }
        }
        let path = self.fetch(&id.name, &key).await?;
        let image = match load_image(&path, id).await {
            Ok(i) => i,
            Err(e) => return Err(self.refuse(&id.name, &key, &path, e)),
        };
        self.found(&id.name, &path);
        Ok((path, image))
    }

    fn found(&self, file: &str, path: &Path) {
        self.observer.emit(ProgressEvent::Found {
            file: file.to_string(),
            path: path.to_path_buf(),
        });
    }

    /// A file the lookup found is unusable or not the one asked for. If this process just
    /// downloaded it, it is removed from the store (with its compressed form), so the cache
    /// never keeps a corrupt or wrong file under the right key; either way the failure is
    /// remembered for the cooldown.
    fn refuse(&self, name: &str, key: &str, path: &Path, e: StoreError) -> StoreError {
        let mut e = e;
        if self.observer.take_created(path) {
            let removed = std::fs::remove_file(path).is_ok();
            let packed = path.with_file_name(health::compressed_name(name));
            if self.observer.take_created(&packed) {
                let _ = std::fs::remove_file(&packed);
            }
            if removed {
                let note = "; it was downloaded just now and has been removed from the cache";
                match &mut e {
                    StoreError::Mismatch { detail, .. } | StoreError::Unusable { detail, .. } => {
                        detail.push_str(note)
                    }
                    _ => {}
                }
            }
        }
        if !self.options.offline {
            self.remember(name, key, &e);
        }
        e
    }

    fn remember(&self, name: &str, key: &str, e: &StoreError) {
        let until = Instant::now() + self.options.server_cooldown;
        lock(&self.health).remember(name, key, e, until);
    }

    /// The path lookups use now: the whole path, or the path without the servers that are
    /// down.
    fn view(&self) -> Arc<View> {
        let down = lock(&self.health).down_now(Instant::now());
        if down.is_empty() {
            return self.full.clone();
        }
        let mut reduced = lock(&self.reduced);
        let same = reduced.as_ref().is_some_and(|v| {
            v.skipped.len() == down.len() && v.skipped.iter().zip(&down).all(|(a, b)| a.0 == b.0)
        });
        if !same {
            let skip: Vec<String> = down.iter().map(|(u, _)| u.clone()).collect();
            let path = self.path.without_urls(&skip);
            *reduced = Some(Arc::new(View {
                downloader: downloader(&path, &self.options, &self.observer),
                path,
                skipped: down,
            }));
        }
        reduced.clone().unwrap_or_else(|| self.full.clone())
    }

    /// Takes the servers that `urls` (files' URLs) were asked from out of lookups.
    fn servers_failed(&self, view: &View, urls: &[(String, String)]) {
        let now = Instant::now();
        let mut h = lock(&self.health);
        for (url, why) in urls {
            if let Some(server) = health::server_of(&view.path, url) {
                h.mark_down(server, why.clone(), now, self.options.server_cooldown);
            }
        }
    }

    /// Gets `name/key/name` through symsrv, under the watchdog. A file that failed recently
    /// is looked for in the local stores only; servers that are down are skipped.
    async fn fetch(&self, name: &str, key: &str) -> Result<PathBuf, StoreError> {
        let remembered = lock(&self.health).failure(name, key, Instant::now());
        if let Some(e) = remembered {
            return match self.lookup(&self.full, name, key, true).await {
                Ok(p) => Ok(p),
                Err(_) => Err(e),
            };
        }
        let view = self.view();
        let offline = self.options.offline || !view.path.has_servers();
        let needle = format!("{name}/{key}/");
        let result = self.lookup(&view, name, key, offline).await;
        if result.is_err() && !offline {
            // A lookup that failed after writing something (a CAB downloaded but not
            // extracted, a partial file, symsrv's lock files) leaves nothing in the store.
            for p in self.observer.take_created_for(name, key) {
                let _ = std::fs::remove_file(&p);
            }
            let roots =
                health::download_roots(&self.path, self.options.default_downstream.as_deref());
            for p in health::remove_partials(&roots, name, key) {
                tracing::debug!(path = %p.display(), "removed what a failed download left");
            }
        }
        match result {
            Ok(p) => Ok(p),
            Err(StoreError::Timeout { file, after, why }) => {
                // The servers of the downloads that were in flight stalled (or, if none was,
                // the connection never came up): out of lookups for the cooldown.
                let mut stuck: Vec<(String, String)> = self
                    .observer
                    .in_flight_for(&needle)
                    .into_iter()
                    .map(|u| (u, format!("{why} after {after:.0?}")))
                    .collect();
                if stuck.is_empty() {
                    stuck = view
                        .path
                        .urls()
                        .map(|u| (u.clone(), format!("{why} after {after:.0?}")))
                        .collect();
                }
                self.servers_failed(&view, &stuck);
                let e = StoreError::Timeout { file, after, why };
                self.remember(name, key, &e);
                Err(e)
            }
            Err(StoreError::NotFound {
                file,
                key: k,
                path,
                detail,
                hint,
            }) => {
                let failures = self.observer.failures_for(&needle);
                self.servers_failed(&view, &failures);
                let mut detail = detail;
                if !view.skipped.is_empty() {
                    let now = Instant::now();
                    let skipped: Vec<String> = view
                        .skipped
                        .iter()
                        .map(|(u, d)| {
                            format!(
                                "{u} not asked ({}; asked again in {} s)",
                                d.why,
                                d.until.saturating_duration_since(now).as_secs()
                            )
                        })
                        .collect();
                    detail.push_str(&format!(" ({})", skipped.join("; ")));
                }
                let e = StoreError::NotFound {
                    file,
                    key: k,
                    path,
                    detail,
                    hint,
                };
                if !offline {
                    self.remember(name, key, &e);
                }
                Err(e)
            }
            Err(e) => {
                if !offline {
                    self.remember(name, key, &e);
                }
                Err(e)
            }
        }
    }

    /// One lookup along `view`'s path.
    async fn lookup(
        &self,
        view: &View,
        name: &str,
        key: &str,
        offline: bool,
    ) -> Result<PathBuf, StoreError> {
        let start = Instant::now();
        self.observer.begin_lookup(&format!("{name}/{key}/"));
        let lookup = async {
            let r = if offline {
                view.downloader.get_file_no_download(name, key).await
            } else {
                view.downloader.get_file(name, key).await
            };
            match r {
                // symsrv knows .exe/.dll/.pdb/.dbg only; drivers (.sys) and upper-case
                // extensions go through our own fetcher, same layout and semantics.
                Err(symsrv::Error::UnrecognizedExtension | symsrv::Error::NoExtension) => {
                    match self
                        .fetcher
                        .get(
                            &view.path,
                            self.options.default_downstream.as_deref(),
                            offline,
                            name,
                            key,
                            &self.observer,
                        )
                        .await
                    {
                        Ok(p) => Ok(p),
                        Err(fetch::FetchError::NotFound) => Err(symsrv::Error::NotFound),
                        Err(fetch::FetchError::Failed(e)) => Err(symsrv::Error::IoError(e)),
                    }
                }
                other => other,
            }
        };
        let watchdog = async {
            let tick = (self.options.stall_timeout / 4)
                .clamp(Duration::from_millis(20), Duration::from_secs(1));
            loop {
                tokio::time::sleep(tick).await;
                let now = Instant::now();
                if now.duration_since(start) > self.options.total_timeout {
                    return "over the total limit".to_string();
                }
                let last = self.observer.last_activity().unwrap_or(start).max(start);
                if now.duration_since(last) > self.options.stall_timeout {
                    return "no progress".to_string();
                }
                if let Some(slow) = self
                    .observer
                    .too_slow(self.options.stall_timeout, self.options.min_rate)
                {
                    return slow;
                }
            }
        };
        let result = tokio::select! {
            r = lookup => r,
            why = watchdog => {
                return Err(StoreError::Timeout {
                    file: name.to_string(),
                    after: start.elapsed(),
                    why,
                });
            }
        };
        match result {
            Ok(p) => Ok(p),
            Err(symsrv::Error::NotFound) | Err(symsrv::Error::NoDefaultDownstreamStore) => {
                let failures = self.observer.failures_for(&format!("{name}/{key}/"));
                let detail = if failures.is_empty() {
                    String::new()
                } else {
                    let shown: Vec<String> =
                        failures.iter().map(|(u, r)| format!("{u}: {r}")).collect();
                    format!(" (errors: {})", shown.join("; "))
                };
                let hint = if self.options.offline {
                    "offline mode searches local stores only: run once online to fill the cache"
                        .to_string()
                } else if !self.path.has_servers() {
                    format!(
                        "add a symbol server, e.g. --symbols \"srv*C:\\symbols*{MICROSOFT_SYMBOL_SERVER}\""
                    )
                } else if !failures.is_empty() || !view.skipped.is_empty() {
                    "the symbol server could not be reached or failed: check the URL, the network and any proxy; \
                     frames in this module show as module+offset meanwhile"
                        .to_string()
                } else {
                    "the servers do not have it: is the file from a private build? add its folder to --symbols".to_string()
                };
                Err(StoreError::NotFound {
                    file: name.to_string(),
                    key: key.to_string(),
                    path: self.path.to_string(),
                    detail,
                    hint,
                })
            }
            Err(e) => Err(StoreError::Store {
                file: name.to_string(),
                detail: e.to_string(),
            }),
        }
    }

    /// Looks for `module`'s PDB and image file and attaches what it finds. Without a PDB, the
    /// image file's exports give names. Updates [`Module::symbol_status`].
    pub async fn load_module(&self, module: &mut Module) -> ModuleLoad {
        let pdb = match module.pdb_id() {
            None => Err(StoreError::Unusable {
                path: PathBuf::from(&module.file_name),
                detail: "the image in memory names no PDB (no CodeView record read)".into(),
            }),
            Some(Err(e)) => Err(StoreError::Unusable {
                path: PathBuf::from(&module.file_name),
                detail: e.to_string(),
            }),
            Some(Ok(id)) => match self.find_pdb(&id).await {
                Ok((path, symbols)) => {
                    module.attach_symbols(symbols, path.clone());
                    Ok(path)
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = &pdb {
            module.symbol_status = match e {
                StoreError::Mismatch { detail, .. } => SymbolStatus::Mismatch(detail.clone()),
                StoreError::NotFound { .. } => SymbolStatus::NotFound(e.to_string()),
                other => SymbolStatus::Unusable(other.to_string()),
            };
        }

        let image = self.load_image_for(module).await;
        if let Ok(p) = &image {
            tracing::debug!(module = %module.name, path = %p.display(), "image file attached");
            if module.symbols.is_none() {
                if let Some(img) = module.image.clone() {
                    module.attach_exports(img.exports());
                }
            }
        }
        ModuleLoad { pdb, image }
    }

    async fn load_image_for(&self, module: &mut Module) -> Result<PathBuf, StoreError> {
        let Some(headers) = module.headers.clone() else {
            return Err(StoreError::Unusable {
                path: PathBuf::from(&module.file_name),
                detail: "no PE headers were read from memory".into(),
            });
        };
        let mut names = vec![module.file_name.clone()];
        // The kernel's store name is its original name (ntkrnlmp.exe), which the PDB's stem
        // gives; the module list calls it ntoskrnl.exe.
        if let Some(Ok(pdb)) = module.pdb_id() {
            if let (Some(stem), Some(ext)) = (
                pdb.name.rsplit_once('.').map(|(s, _)| s),
                module.file_name.rsplit_once('.').map(|(_, e)| e),
            ) {
                let alt = format!("{stem}.{ext}");
                if !alt.eq_ignore_ascii_case(&module.file_name) {
                    names.push(alt);
                }
            }
        }
        let mut last = None;
        for name in names {
            let id = match headers.image_id(&name) {
                Ok(id) => id,
                Err(e) => {
                    last = Some(StoreError::Unusable {
                        path: PathBuf::from(&name),
                        detail: e.to_string(),
                    });
                    continue;
                }
            };
            match self.find_image(&id).await {
                Ok((path, image)) => match module.attach_image(image) {
                    Ok(()) => return Ok(path),
                    Err(detail) => last = Some(StoreError::Mismatch { path, detail }),
                },
                Err(e @ StoreError::Timeout { .. }) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| StoreError::Unusable {
            path: PathBuf::from(&module.file_name),
            detail: "no usable image name".into(),
        }))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

async fn load_pdb(path: PathBuf, id: PdbId) -> Result<ModuleSymbols, StoreError> {
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| StoreError::Unusable {
            path: path.clone(),
            detail: e.to_string(),
        })?;
    let p = path.clone();
    let parsed = tokio::task::spawn_blocking(move || ModuleSymbols::parse(bytes, Some(&id)))
        .await
        .map_err(|e| StoreError::Unusable {
            path: p,
            detail: e.to_string(),
        })?;
    parsed.map_err(|e| match e {
        PdbError::Mismatch { .. } => StoreError::Mismatch {
            path: path.clone(),
            detail: e.to_string(),
        },
        other => StoreError::Unusable {
            path: path.clone(),
            detail: other.to_string(),
        },
    })
}

async fn load_image(path: &Path, id: &ImageId) -> Result<PeFile, StoreError> {
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|e| StoreError::Unusable {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    let image = PeFile::parse(bytes).map_err(|e| StoreError::Unusable {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    let h = image.headers();
    if h.time_date_stamp != id.time_date_stamp || h.size_of_image != id.size_of_image {
        return Err(StoreError::Mismatch {
            path: path.to_path_buf(),
            detail: format!(
                "{} is {:08X}{:x}, the image in memory is {}",
                id.name,
                h.time_date_stamp,
                h.size_of_image,
                id.store_key()
            ),
        });
    }
    Ok(image)
}
