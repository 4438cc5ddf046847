//! A tiny in-process HTTP/1.1 file server on 127.0.0.1 for symbol-server tests: GET only, one
//! request per connection, files from a directory, request log, and the trouble a symbol
//! server can be in ([`Trouble`]): paths that stall, trickle, end early or fail with a status.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the server misbehaves, for requests whose path contains the marker.
#[derive(Clone, Debug, Default)]
pub struct Trouble {
    /// Headers, then nothing.
    pub stall: Option<String>,
    /// The file, a few bytes at a time (bytes per write, pause between writes).
    pub trickle: Option<(String, usize, Duration)>,
    /// Half the file, then the connection closes (Content-Length says the whole).
    pub truncate: Option<String>,
    /// Every request answered with this status and an empty body.
    pub status: Option<u16>,
}

pub struct Server {
    pub url: String,
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
}

impl Server {
    /// Serves `root`. Requests whose path contains `stall_marker` get no answer until the
    /// server stops.
    pub fn start(root: &Path, stall_marker: Option<&str>) -> Server {
        Self::with_trouble(
            root,
            Trouble {
                stall: stall_marker.map(str::to_string),
                ..Trouble::default()
            },
        )
    }

    /// Serves `root`, in `trouble`.
    pub fn with_trouble(root: &Path, trouble: Trouble) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let root = root.to_path_buf();
        {
            let (log, stop) = (log.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (root, log, trouble, stop) =
                        (root.clone(), log.clone(), trouble.clone(), stop.clone());
                    std::thread::spawn(move || serve(conn, &root, &log, &trouble, &stop));
                }
            });
        }
        Server {
            url: format!("http://{addr}/"),
            log,
            stop,
            addr,
        }
    }

    /// Paths requested so far.
    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

fn serve(
    mut conn: TcpStream,
    root: &Path,
    log: &Mutex<Vec<String>>,
    trouble: &Trouble,
    stop: &AtomicBool,
) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    loop {
        let mut h = String::new();
        match reader.read_line(&mut h) {
            Ok(0) | Err(_) => break,
            Ok(_) if h == "\r\n" || h == "\n" => break,
            Ok(_) => {}
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    log.lock().unwrap().push(path.clone());
    if let Some(code) = trouble.status {
        let _ = write!(
            conn,
            "HTTP/1.1 {code} Trouble\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return;
    }
    if trouble.stall.as_deref().is_some_and(|m| path.contains(m)) {
        // Headers, then nothing: a server that hangs mid-download.
        let _ = conn.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nConnection: close\r\n\r\nMSF",
        );
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        return;
    }
    let rel: PathBuf = path
        .trim_start_matches('/')
        .split('/')
        .filter(|c| !c.is_empty() && *c != "." && *c != "..")
        .collect();
    match std::fs::read(root.join(rel)) {
        Ok(body)
            if trouble
                .truncate
                .as_deref()
                .is_some_and(|m| path.contains(m)) =>
        {
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(&body[..body.len() / 2]);
        }
        Ok(body)
            if trouble
                .trickle
                .as_ref()
                .is_some_and(|(m, _, _)| path.contains(m)) =>
        {
            let Some((_, step, pause)) = &trouble.trickle else {
                return;
            };
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            for chunk in body.chunks((*step).max(1)) {
                if stop.load(Ordering::SeqCst) || conn.write_all(chunk).is_err() {
                    return;
                }
                let _ = conn.flush();
                std::thread::sleep(*pause);
            }
        }
        Ok(body) => {
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(&body);
        }
        Err(_) => {
            let _ = conn.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    }
    let _ = conn.flush();
}
