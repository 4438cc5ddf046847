//! Serial ports through tokio-serial: 8N1, no flow control, stale input cleared.

use tokio_serial::{
    ClearBuffer, DataBits, ErrorKind, FlowControl, Parity, SerialPort, SerialPortBuilderExt,
    StopBits,
};

use crate::{Link, TransportError};

#[cfg(unix)]
const DIALOUT_HINT: &str = "add your user to the group that owns the device (`dialout` on \
     Debian/Ubuntu/Fedora, `uucp` on Arch): sudo usermod -aG dialout $USER, then log in again";
const BUSY_HINT: &str = "another program has it open (another debugger, a terminal program, \
     ModemManager); close it and retry";

pub(crate) fn open(port: &str, baud: u32) -> Result<Link, TransportError> {
    #[cfg(unix)]
    precheck_unix(port)?;
    let builder = tokio_serial::new(device_name(port), baud)
        .data_bits(DataBits::Eight)
        .parity(Parity::None)
        .stop_bits(StopBits::One)
        .flow_control(FlowControl::None);
    #[allow(unused_mut)] // mutated on Unix only
    let mut stream = builder.open_native_async().map_err(|e| classify(port, e))?;
    #[cfg(unix)]
    if let Err(e) = stream.set_exclusive(true) {
        tracing::debug!(port, error = %e, "could not set exclusive access (TIOCEXCL)");
    }
    stream
        .clear(ClearBuffer::Input)
        .map_err(|source| TransportError::Serial {
            port: port.to_string(),
            source,
        })?;
    tracing::debug!(port, baud, "opened serial port");
    Ok(Link::serial(stream, format!("serial port {port}")))
}

/// The name to hand to tokio-serial. On Windows, mio-serial puts `\\.\` in front of the name
/// itself, so `\\.\COM12` (kd's form for ports above 9) must lose its prefix.
fn device_name(port: &str) -> &str {
    if cfg!(windows) && port.len() > 4 && port[..4].eq_ignore_ascii_case(r"\\.\") {
        &port[4..]
    } else {
        port
    }
}

/// Distinguishes a missing device, and a socket given where a tty was expected, before opening.
#[cfg(unix)]
fn precheck_unix(port: &str) -> Result<(), TransportError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(port) {
        Ok(meta) if meta.file_type().is_socket() => Err(TransportError::Unsupported {
            what: format!("serial port {port}"),
            reason: format!(
                "{port} is a Unix socket (a VM's COM port?), not a serial device: use com:pipe,port={port}"
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(not_found(port)),
        _ => Ok(()),
    }
}

fn not_found(port: &str) -> TransportError {
    TransportError::SerialPortNotFound {
        port: port.to_string(),
        available: available_ports(),
    }
}

/// Names of the serial ports this machine reports.
pub(crate) fn available_ports() -> Vec<String> {
    tokio_serial::available_ports()
        .map(|ports| ports.into_iter().map(|p| p.port_name).collect())
        .unwrap_or_default()
}

fn classify(port: &str, source: tokio_serial::Error) -> TransportError {
    let what = format!("serial port {port}");
    match source.kind {
        ErrorKind::Io(std::io::ErrorKind::NotFound) => not_found(port),
        // On Unix NoDevice means EBUSY or a held flock: someone else has the port.
        #[cfg(unix)]
        ErrorKind::NoDevice => TransportError::Busy {
            what,
            hint: BUSY_HINT,
        },
        #[cfg(unix)]
        ErrorKind::Io(std::io::ErrorKind::PermissionDenied) => TransportError::PermissionDenied {
            what,
            hint: DIALOUT_HINT,
            source: source.into(),
        },
        // Windows reports both "no such port" and "port in use" (ERROR_ACCESS_DENIED: COM ports
        // are opened without sharing) as NoDevice; the port list tells them apart.
        #[cfg(windows)]
        ErrorKind::NoDevice | ErrorKind::Io(std::io::ErrorKind::PermissionDenied) => {
            let available = available_ports();
            let wanted = device_name(port);
            if available.iter().any(|p| p.eq_ignore_ascii_case(wanted)) {
                TransportError::Busy {
                    what,
                    hint: BUSY_HINT,
                }
            } else {
                TransportError::SerialPortNotFound {
                    port: port.to_string(),
                    available,
                }
            }
        }
        _ => TransportError::Serial {
            port: port.to_string(),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn device_name_keeps_plain_names() {
        assert_eq!(super::device_name("COM1"), "COM1");
        assert_eq!(super::device_name("/dev/ttyS0"), "/dev/ttyS0");
        #[cfg(windows)]
        assert_eq!(super::device_name(r"\\.\COM12"), "COM12");
    }
}
