//! Byte transports to a KD target: serial ports, VM COM ports (Windows named pipes, Unix
//! sockets), TCP; and parsing of kd's `-k` connection strings.
//!
//! The transport knows only bytes. [`open`] turns an [`Endpoint`] into a [`Link`], which is
//! `AsyncRead + AsyncWrite + Unpin + Send`; the KD protocol runs on top of it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use kdpilot_transport::{open_waiting, Endpoint, WaitOptions};
//!
//! // Pasted from a kd command line.
//! let endpoint: Endpoint = r"com:pipe,port=\\.\pipe\com_1,resets=0,reconnect".parse()?;
//! let link = open_waiting(&endpoint, &WaitOptions::default(), |event| {
//!     eprintln!("{event}"); // "waiting for named pipe \\.\pipe\com_1 to appear"
//! })
//! .await?;
//! # let _ = link; Ok(()) }
//! ```
//!
//! # Connection strings
//! See [`ACCEPTED_FORMS`]. In short: kd's `com:port=COM1,baud=19200`,
//! `com:pipe,port=\\.\pipe\com_1,resets=0,reconnect` and `com:ipport=4445,port=HOST`, pasted
//! verbatim (keys in any order and case; a leading `-k ` is ignored), plus `tcp:HOST:PORT`
//! (`tcp:[::1]:4445`), `unix:PATH`, and bare `COM3`, `\\.\COM12`, `/dev/ttyUSB0` (serial) or
//! `\\.\pipe\NAME` (pipe). A serial port without `baud=` runs at [`DEFAULT_BAUD`] (115200, as
//! bcdedit configures by default). On Unix hosts `com:pipe,port=` names the Unix socket that
//! VirtualBox, VMware or QEMU made for the VM's COM port. KDNET (`net:`) is recognised and
//! rejected with a hint.
//!
//! # Reconnecting
//! With `reconnect`, [`open_waiting`] waits for the port, pipe or socket to appear. When reading
//! returns `Ok(0)` or an error where [`is_link_lost`] holds, the link is gone: drop it, call
//! [`open_waiting`] again, and resynchronise (after [`Link::discard_input`]).

mod endpoint;
mod error;
mod link;
mod open;
#[cfg(windows)]
mod pipe_windows;
mod serial;
mod socket;

pub use endpoint::{Endpoint, EndpointKind, ParseEndpointError, ACCEPTED_FORMS, DEFAULT_BAUD};
pub use error::{is_link_lost, TransportError};
pub use link::{Link, LinkKind};
pub use open::{open, open_waiting, WaitEvent, WaitOptions};

/// Names of the serial ports this machine reports (`COM1`, `/dev/ttyUSB0`), for `--list-ports`
/// style output and error messages. Empty when none are found or enumeration fails.
pub fn available_serial_ports() -> Vec<String> {
    serial::available_ports()
}
