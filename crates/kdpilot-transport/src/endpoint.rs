//! Connection strings: kd's `-k` syntax, pasted verbatim, plus `tcp:` and `unix:`.
//!
//! The parser is the same on every platform (a string that parses on Linux parses on Windows);
//! whether the endpoint can be opened on this host is decided by [`crate::open`].

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Baud rate used when a serial connection string has no `baud=`.
///
/// 115200 is what `bcdedit /dbgsettings serial` configures when no `baudrate:` is given, and the
/// fastest rate kdcom supports. XP-era targets set up with `/baudrate=19200` need `baud=19200`.
pub const DEFAULT_BAUD: u32 = 115_200;

/// The connection strings the parser accepts, with examples. Shown by errors for strings it does
/// not recognise; a CLI can also print it in `--help`.
pub const ACCEPTED_FORMS: &str = r"accepted connection strings (kd's -k syntax, pasted verbatim, plus tcp: and unix:):
  com:port=COM1,baud=19200                          serial port; baud defaults to 115200
  com:port=\\.\COM12,baud=115200                    serial port in Windows device form
  com:port=/dev/ttyS0,baud=115200                   serial port on Linux/macOS
  com:pipe,port=\\.\pipe\com_1,resets=0,reconnect   VM COM port as a named pipe (Windows host)
  com:pipe,port=/tmp/com_1,reconnect                VM COM port as a Unix socket (Linux/macOS host)
  com:ipport=4445,port=127.0.0.1                    serial over TCP (kd syntax)
  tcp:127.0.0.1:4445   tcp:[::1]:4445               serial over TCP, e.g. QEMU -serial tcp::4445,server
  unix:/tmp/com_1.sock                              Unix socket, e.g. QEMU -serial unix:/tmp/com_1.sock,server
  COM3   \\.\COM12   /dev/ttyUSB0                   bare serial port (115200 baud)
  \\.\pipe\com_1                                    bare named pipe
options for all of them: resets=N (RESET packets sent while synchronising; 0 = unlimited),
  reconnect (wait for the port, pipe or socket to appear, and reopen it when it goes away)";

/// Keys accepted after `com:`.
const COM_KEYS: &str = "port=, baud=, pipe, ipport=, resets=, reconnect";
/// Keys accepted after the address of `tcp:` and `unix:`.
const SOCKET_KEYS: &str = "resets=, reconnect";
/// What to use instead of a transport kdpilot does not speak.
const USE_SERIAL: &str = r"use a serial/pipe connection: com:port=COM1,baud=115200 or com:pipe,port=\\.\pipe\com_1,reconnect";

/// Where the target's debug port is.
///
/// Parse one from a connection string (`"com:port=COM1,baud=19200".parse()`); [`fmt::Display`]
/// gives the canonical string back, and parsing that yields an equal `Endpoint`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    kind: EndpointKind,
    resets: Option<u32>,
    reconnect: bool,
}

/// The kind of link, with its address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EndpointKind {
    /// A serial port (`COM1`, `\\.\COM12`, `/dev/ttyS0`), opened 8N1 without flow control.
    Serial {
        /// The device, as written by the user.
        port: String,
        /// Line rate in bits per second.
        baud: u32,
    },
    /// kd's `com:pipe`: the COM port of a VM. On Windows this is a named pipe
    /// (`\\.\pipe\com_1`, `\\VMHost\pipe\com_1`); on Unix hosts VirtualBox, VMware and QEMU
    /// expose the VM's COM port as a Unix socket, and `path` is that socket's path.
    Pipe {
        /// Pipe name or socket path.
        path: String,
    },
    /// A TCP connection (serial-over-TCP, e.g. QEMU `-serial tcp::4445,server`).
    Tcp {
        /// Host name or IP address; IPv6 addresses without brackets.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A Unix-domain stream socket (e.g. QEMU `-serial unix:PATH,server`). Not available on Windows.
    Unix {
        /// Socket path.
        path: PathBuf,
    },
}

impl Endpoint {
    /// An endpoint of the given kind, without `resets=` and without `reconnect`.
    pub fn new(kind: EndpointKind) -> Self {
        Self {
            kind,
            resets: None,
            reconnect: false,
        }
    }

    /// Sets `resets=` (`Some(0)` = unlimited RESET packets, `None` = the client's default).
    pub fn with_resets(mut self, resets: Option<u32>) -> Self {
        self.resets = resets;
        self
    }

    /// Sets or clears the `reconnect` flag.
    pub fn with_reconnect(mut self, reconnect: bool) -> Self {
        self.reconnect = reconnect;
        self
    }

    /// The kind of link and its address.
    pub fn kind(&self) -> &EndpointKind {
        &self.kind
    }

    /// The line rate in bits per second for serial ports; `None` for pipes and sockets, which have
    /// no line rate of their own.
    pub fn baud(&self) -> Option<u32> {
        match self.kind {
            EndpointKind::Serial { baud, .. } => Some(baud),
            _ => None,
        }
    }

    /// Bytes per second the line can carry (8N1 = 10 bits per byte, so `baud / 10`); `None` when
    /// the link is not rate-limited. Clients scale their timeouts by it: a 4 KiB reply takes more
    /// than 2 s at 19200 baud.
    pub fn line_rate_bytes_per_sec(&self) -> Option<u32> {
        self.baud().map(|baud| (baud / 10).max(1))
    }

    /// kd's `resets=N`: how many RESET packets to send while synchronising; `Some(0)` means
    /// unlimited, `None` means not given (the client's default).
    pub fn resets(&self) -> Option<u32> {
        self.resets
    }

    /// kd's `reconnect`: wait for the port/pipe/socket to appear (see [`crate::open_waiting`]),
    /// and reopen it when the link is lost.
    pub fn reconnect(&self) -> bool {
        self.reconnect
    }

    /// The address alone, for messages: `COM1`, `\\.\pipe\com_1`, `127.0.0.1:4445`, `/tmp/sock`.
    pub fn address(&self) -> String {
        match &self.kind {
            EndpointKind::Serial { port, .. } => port.clone(),
            EndpointKind::Pipe { path } => path.clone(),
            EndpointKind::Tcp { host, port } => host_port(host, *port),
            EndpointKind::Unix { path } => path.display().to_string(),
        }
    }

    /// What the endpoint is, for messages: `serial port COM1`, `named pipe \\.\pipe\com_1`
    /// (`Unix socket /tmp/com_1` for `com:pipe` on Unix hosts), `TCP 127.0.0.1:4445`.
    pub fn description(&self) -> String {
        let noun = match &self.kind {
            EndpointKind::Serial { .. } => "serial port",
            EndpointKind::Pipe { .. } if cfg!(windows) => "named pipe",
            EndpointKind::Pipe { .. } | EndpointKind::Unix { .. } => "Unix socket",
            EndpointKind::Tcp { .. } => "TCP",
        };
        format!("{noun} {}", self.address())
    }
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            EndpointKind::Serial { port, baud } => write!(f, "com:port={port},baud={baud}")?,
            EndpointKind::Pipe { path } => write!(f, "com:pipe,port={path}")?,
            EndpointKind::Tcp { host, port } => write!(f, "tcp:{}", host_port(host, *port))?,
            EndpointKind::Unix { path } => write!(f, "unix:{}", path.display())?,
        }
        if let Some(resets) = self.resets {
            write!(f, ",resets={resets}")?;
        }
        if self.reconnect {
            f.write_str(",reconnect")?;
        }
        Ok(())
    }
}

/// Why a connection string was rejected. The messages name the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseEndpointError {
    /// The string was empty.
    #[error("empty connection string\n{ACCEPTED_FORMS}")]
    Empty,
    /// Not a form the parser knows.
    #[error("`{input}` is not a connection string kdpilot understands\n{ACCEPTED_FORMS}")]
    Unrecognized {
        /// The rejected string.
        input: String,
    },
    /// A `key=value` or flag the scheme does not have.
    #[error("unknown key `{key}` in a `{scheme}:` connection string (accepted: {accepted})")]
    UnknownKey {
        /// The key as written.
        key: String,
        /// `com`, `tcp` or `unix`.
        scheme: &'static str,
        /// The keys the scheme accepts.
        accepted: &'static str,
    },
    /// A key that needs a value was written as a flag (`baud` instead of `baud=19200`).
    #[error("`{key}` needs a value, e.g. {example}")]
    MissingValue {
        /// The key as written.
        key: String,
        /// An example of the key with a value.
        example: &'static str,
    },
    /// A flag was given a value (`reconnect=1`).
    #[error("`{key}` is a flag and takes no value: write `,{key}`")]
    UnexpectedValue {
        /// The flag.
        key: &'static str,
    },
    /// A value that does not parse.
    #[error("invalid {key}=`{value}`: expected {expected}")]
    InvalidValue {
        /// The key.
        key: &'static str,
        /// The value as written.
        value: String,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// The same key twice.
    #[error("`{key}` is given twice")]
    DuplicateKey {
        /// The key.
        key: &'static str,
    },
    /// `com:` without `port=`.
    #[error(r"`com:` needs port=, e.g. com:port=COM1,baud=115200 or com:pipe,port=\\.\pipe\com_1")]
    MissingPort,
    /// Two keys that exclude each other (`pipe` and `ipport=`).
    #[error("`{first}` and `{second}` cannot be combined")]
    Conflict {
        /// One key.
        first: &'static str,
        /// The other key.
        second: &'static str,
    },
    /// A `tcp:` or `unix:` address that does not parse.
    #[error("invalid {scheme}: address `{address}`: {reason}")]
    InvalidAddress {
        /// `tcp` or `unix`.
        scheme: &'static str,
        /// The address as written.
        address: String,
        /// What is wrong, with an example.
        reason: &'static str,
    },
    /// `net:` (KDNET).
    #[error("KDNET (`net:`) is not supported yet; {USE_SERIAL}")]
    Kdnet,
    /// Another kd transport kdpilot does not speak (`usb:`, `1394:`, `com:modem`, local `-kl`).
    #[error("kd's `{transport}` connection is not supported; {USE_SERIAL}")]
    UnsupportedTransport {
        /// The transport as kd names it.
        transport: String,
    },
}

impl FromStr for Endpoint {
    type Err = ParseEndpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let input = strip_dash_k(s.trim());
        if input.is_empty() {
            return Err(ParseEndpointError::Empty);
        }
        if input.eq_ignore_ascii_case("-kl") {
            return Err(ParseEndpointError::UnsupportedTransport {
                transport: "-kl (local kernel debugging)".into(),
            });
        }
        match split_scheme(input) {
            Some((scheme, body)) => match scheme.to_ascii_lowercase().as_str() {
                "com" => parse_com(body),
                "tcp" => parse_socket(body, "tcp"),
                "unix" => parse_socket(body, "unix"),
                "net" => Err(ParseEndpointError::Kdnet),
                "usb" | "1394" => Err(ParseEndpointError::UnsupportedTransport {
                    transport: format!("{}:", scheme.to_ascii_lowercase()),
                }),
                _ => Err(unrecognized(input)),
            },
            None => parse_bare(input).ok_or_else(|| unrecognized(input)),
        }
    }
}

fn unrecognized(input: &str) -> ParseEndpointError {
    ParseEndpointError::Unrecognized {
        input: input.to_string(),
    }
}

/// Accepts `-k com:...` pasted with kd's option in front.
fn strip_dash_k(s: &str) -> &str {
    match s.strip_prefix("-k") {
        Some(rest) if rest.starts_with(char::is_whitespace) => rest.trim_start(),
        _ => s,
    }
}

/// `scheme:body`, where a scheme is at least two ASCII alphanumerics (so `C:\x` is no scheme).
fn split_scheme(s: &str) -> Option<(&str, &str)> {
    let (scheme, body) = s.split_once(':')?;
    (scheme.len() >= 2 && scheme.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then_some((scheme, body))
}

/// `COM3`, `\\.\COM12`, `/dev/ttyUSB0` (serial at [`DEFAULT_BAUD`]) and `\\.\pipe\NAME` /
/// `\\HOST\pipe\NAME` (pipe). Anything else is not guessed at.
fn parse_bare(s: &str) -> Option<Endpoint> {
    let lower = s.to_ascii_lowercase();
    let com_number = lower.strip_prefix(r"\\.\").unwrap_or(&lower);
    let is_com = com_number
        .strip_prefix("com")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let kind = if is_com || (s.starts_with("/dev/") && s.len() > 5) {
        EndpointKind::Serial {
            port: s.to_string(),
            baud: DEFAULT_BAUD,
        }
    } else if lower.starts_with(r"\\") && lower.contains(r"\pipe\") {
        EndpointKind::Pipe {
            path: s.to_string(),
        }
    } else {
        return None;
    };
    Some(Endpoint::new(kind))
}

/// A `key=value` or `flag` token, key as written.
struct Token<'a> {
    key: &'a str,
    value: Option<&'a str>,
}

fn tokens(body: &str) -> impl Iterator<Item = Token<'_>> {
    body.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| match t.split_once('=') {
            Some((k, v)) => Token {
                key: k.trim(),
                value: Some(v.trim()),
            },
            None => Token {
                key: t,
                value: None,
            },
        })
}

/// `resets=` and `reconnect`, shared by every scheme.
#[derive(Default)]
struct CommonOptions {
    resets: Option<u32>,
    reconnect: bool,
}

impl CommonOptions {
    /// Applies the token if it is a common option; `Ok(false)` if it is not one.
    fn apply(&mut self, lower_key: &str, token: &Token<'_>) -> Result<bool, ParseEndpointError> {
        match lower_key {
            "resets" => {
                let value = need_value(token, "resets=0")?;
                let n = parse_number::<u32>(
                    "resets",
                    value,
                    "a count of RESET packets (0 = unlimited)",
                )?;
                set_once(&mut self.resets, "resets", n)?;
            }
            "reconnect" => {
                flag(token, "reconnect")?;
                if self.reconnect {
                    return Err(ParseEndpointError::DuplicateKey { key: "reconnect" });
                }
                self.reconnect = true;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn finish(self, kind: EndpointKind) -> Endpoint {
        Endpoint {
            kind,
            resets: self.resets,
            reconnect: self.reconnect,
        }
    }
}

fn need_value<'a>(token: &Token<'a>, example: &'static str) -> Result<&'a str, ParseEndpointError> {
    match token.value {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(ParseEndpointError::MissingValue {
            key: token.key.to_string(),
            example,
        }),
    }
}

fn flag(token: &Token<'_>, key: &'static str) -> Result<(), ParseEndpointError> {
    match token.value {
        None => Ok(()),
        Some(_) => Err(ParseEndpointError::UnexpectedValue { key }),
    }
}

fn set_once<T>(
    slot: &mut Option<T>,
    key: &'static str,
    value: T,
) -> Result<(), ParseEndpointError> {
    if slot.is_some() {
        return Err(ParseEndpointError::DuplicateKey { key });
    }
    *slot = Some(value);
    Ok(())
}

fn parse_number<T: FromStr>(
    key: &'static str,
    value: &str,
    expected: &'static str,
) -> Result<T, ParseEndpointError> {
    value.parse().map_err(|_| ParseEndpointError::InvalidValue {
        key,
        value: value.to_string(),
        expected,
    })
}

fn parse_com(body: &str) -> Result<Endpoint, ParseEndpointError> {
    let mut common = CommonOptions::default();
    let mut port: Option<String> = None;
    let mut baud: Option<u32> = None;
    let mut ipport: Option<u16> = None;
    let mut pipe = false;
    for token in tokens(body) {
        let key = token.key.to_ascii_lowercase();
        if common.apply(&key, &token)? {
            continue;
        }
        match key.as_str() {
            "port" => {
                let value = need_value(&token, "port=COM1")?;
                set_once(&mut port, "port", value.to_string())?;
            }
            "baud" => {
                let value = need_value(&token, "baud=115200")?;
                let rate =
                    parse_number::<u32>("baud", value, "a baud rate such as 19200 or 115200")?;
                if rate == 0 {
                    return Err(ParseEndpointError::InvalidValue {
                        key: "baud",
                        value: value.to_string(),
                        expected: "a baud rate such as 19200 or 115200",
                    });
                }
                set_once(&mut baud, "baud", rate)?;
            }
            "ipport" => {
                let value = need_value(&token, "ipport=4445")?;
                let p = parse_number::<u16>("ipport", value, "a TCP port number (1-65535)")?;
                set_once(&mut ipport, "ipport", p)?;
            }
            "pipe" => {
                flag(&token, "pipe")?;
                if pipe {
                    return Err(ParseEndpointError::DuplicateKey { key: "pipe" });
                }
                pipe = true;
            }
            "modem" => {
                return Err(ParseEndpointError::UnsupportedTransport {
                    transport: "com:modem".into(),
                })
            }
            _ => {
                return Err(ParseEndpointError::UnknownKey {
                    key: token.key.to_string(),
                    scheme: "com",
                    accepted: COM_KEYS,
                })
            }
        }
    }
    let port = port.ok_or(ParseEndpointError::MissingPort)?;
    let kind = match (pipe, ipport) {
        (true, Some(_)) => {
            return Err(ParseEndpointError::Conflict {
                first: "pipe",
                second: "ipport=",
            })
        }
        // A pipe or a socket has no line rate: `baud=` (common in VirtualBox guides) is
        // accepted and ignored, as kd does.
        (true, None) => EndpointKind::Pipe { path: port },
        (false, Some(tcp_port)) => {
            if tcp_port == 0 {
                return Err(ParseEndpointError::InvalidValue {
                    key: "ipport",
                    value: "0".into(),
                    expected: "a TCP port number (1-65535)",
                });
            }
            EndpointKind::Tcp {
                host: unbracket(&port).to_string(),
                port: tcp_port,
            }
        }
        (false, None) => EndpointKind::Serial {
            port,
            baud: baud.unwrap_or(DEFAULT_BAUD),
        },
    };
    Ok(common.finish(kind))
}

fn unbracket(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// `tcp:HOST:PORT[,options]` and `unix:PATH[,options]`.
fn parse_socket(body: &str, scheme: &'static str) -> Result<Endpoint, ParseEndpointError> {
    let (address, options) = body.split_once(',').unwrap_or((body, ""));
    let address = address.trim();
    let kind = if scheme == "tcp" {
        parse_tcp_address(address)?
    } else {
        if address.is_empty() {
            return Err(ParseEndpointError::InvalidAddress {
                scheme,
                address: address.into(),
                reason: "the socket path is missing, e.g. unix:/tmp/com_1.sock",
            });
        }
        EndpointKind::Unix {
            path: PathBuf::from(address),
        }
    };
    let mut common = CommonOptions::default();
    for token in tokens(options) {
        let key = token.key.to_ascii_lowercase();
        if !common.apply(&key, &token)? {
            return Err(ParseEndpointError::UnknownKey {
                key: token.key.to_string(),
                scheme,
                accepted: SOCKET_KEYS,
            });
        }
    }
    Ok(common.finish(kind))
}

fn parse_tcp_address(address: &str) -> Result<EndpointKind, ParseEndpointError> {
    let invalid = |reason| ParseEndpointError::InvalidAddress {
        scheme: "tcp",
        address: address.to_string(),
        reason,
    };
    const EXAMPLE: &str = "expected HOST:PORT, e.g. tcp:127.0.0.1:4445 or tcp:[::1]:4445";
    let (host, port) = if let Some(rest) = address.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(|| invalid(EXAMPLE))?;
        let port = after.strip_prefix(':').ok_or_else(|| invalid(EXAMPLE))?;
        (host, port)
    } else {
        let (host, port) = address.rsplit_once(':').ok_or_else(|| invalid(EXAMPLE))?;
        if host.contains(':') {
            return Err(invalid(
                "put IPv6 addresses in brackets, e.g. tcp:[::1]:4445",
            ));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(invalid(EXAMPLE));
    }
    let port: u16 = port
        .parse()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| invalid("the port must be a number from 1 to 65535"))?;
    Ok(EndpointKind::Tcp {
        host: host.to_string(),
        port,
    })
}
