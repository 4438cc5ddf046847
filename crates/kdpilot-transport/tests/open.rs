//! Opening real links on loopback: TCP, Unix sockets, pty pairs. Every test is bounded by
//! [`bounded`] and cleans up (temp dirs, tasks dropped with the runtime).

use std::future::Future;
use std::time::{Duration, Instant};

use kdpilot_transport::{
    is_link_lost, open, open_waiting, Endpoint, LinkKind, TransportError, WaitOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Fails the test instead of hanging it.
async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("test took longer than 10 s")
}

fn endpoint(s: &str) -> Endpoint {
    s.parse().expect("endpoint parses")
}

/// Echoes everything it reads until EOF.
async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut stream: S) {
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Writes `data` to the link and expects it echoed back.
async fn round_trip(link: &mut kdpilot_transport::Link, data: &[u8]) {
    link.write_all(data).await.unwrap();
    link.flush().await.unwrap();
    let mut back = vec![0u8; data.len()];
    link.read_exact(&mut back).await.unwrap();
    assert_eq!(back, data);
}

/// The KD client takes any `AsyncRead + AsyncWrite + Unpin + Send`, and the CLI spawns the
/// opening future on a multi-threaded runtime.
#[test]
fn link_and_open_futures_are_send() {
    fn stream<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>() {}
    fn send<T: Send>(_: &T) {}
    stream::<kdpilot_transport::Link>();
    let ep = endpoint("tcp:127.0.0.1:1");
    let options = WaitOptions::default();
    send(&open(&ep));
    send(&open_waiting(&ep, &options, |_| {}));
    send(&TransportError::Busy {
        what: String::new(),
        hint: "",
    });
}

#[tokio::test]
async fn duplex_streams_can_be_wrapped() {
    bounded(async {
        let (near, far) = tokio::io::duplex(64);
        tokio::spawn(echo(far));
        let mut link = kdpilot_transport::Link::from_stream(near, "simulator");
        assert_eq!(link.kind(), LinkKind::Other);
        assert_eq!(link.peer(), "simulator");
        round_trip(&mut link, b"sim").await;
    })
    .await;
}

#[tokio::test]
async fn tcp_open_exchanges_bytes() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            assert!(stream.nodelay().is_ok());
            echo(stream).await;
        });
        let mut link = open(&endpoint(&format!("tcp:127.0.0.1:{port}")))
            .await
            .unwrap();
        assert_eq!(link.kind(), LinkKind::Tcp);
        assert_eq!(link.peer(), format!("TCP 127.0.0.1:{port}"));
        round_trip(&mut link, b"\x69\x69\x69\x69\x06\x00").await;
        round_trip(&mut link, &[0x62]).await;
        drop(link);
        server.await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn kd_ipport_form_opens_tcp() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { echo(listener.accept().await.unwrap().0).await });
        let mut link = open(&endpoint(&format!("com:ipport={port},port=127.0.0.1")))
            .await
            .unwrap();
        round_trip(&mut link, b"kd over tcp").await;
    })
    .await;
}

#[tokio::test]
async fn tcp_eof_is_reported_as_link_lost() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move { drop(listener.accept().await.unwrap()) });
        let mut link = open(&endpoint(&format!("tcp:127.0.0.1:{port}")))
            .await
            .unwrap();
        server.await.unwrap();
        let mut byte = [0u8; 1];
        let err = link.read_exact(&mut byte).await.unwrap_err();
        assert!(is_link_lost(&err), "{err:?}");
        let err = TransportError::from_link_io(link.peer(), err);
        assert!(matches!(err, TransportError::LinkLost { .. }));
        assert!(err.is_transient());
        assert_eq!(
            err.to_string(),
            format!("link to TCP 127.0.0.1:{port} lost")
        );
    })
    .await;
}

#[tokio::test]
async fn discard_input_drops_stale_bytes() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.write_all(b"stale RESET ACKs").await.unwrap();
            go_rx.await.unwrap();
            stream.write_all(b"fresh").await.unwrap();
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest).await;
        });
        let mut link = open(&endpoint(&format!("tcp:127.0.0.1:{port}")))
            .await
            .unwrap();
        // Give loopback time to deliver the stale bytes.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut dropped = 0;
        while dropped < 16 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            dropped += link.discard_input().unwrap();
        }
        assert_eq!(dropped, 16);
        go_tx.send(()).unwrap();
        let mut fresh = [0u8; 5];
        link.read_exact(&mut fresh).await.unwrap();
        assert_eq!(&fresh, b"fresh");
    })
    .await;
}

/// A local port with nothing listening on it.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn refused_tcp_port_says_what_to_check() {
    bounded(async {
        let port = closed_port().await;
        let err = open(&endpoint(&format!("tcp:127.0.0.1:{port}")))
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransportError::ConnectionRefused { .. }),
            "{err:?}"
        );
        assert!(err.is_transient());
        assert_eq!(
            err.to_string(),
            format!(
                "TCP 127.0.0.1:{port} refused the connection: is the VM running, and is its \
                 serial port a TCP server (QEMU: -serial tcp::4445,server,nowait)?"
            )
        );
    })
    .await;
}

/// Built by hand: a real lookup would depend on the machine's resolver.
#[test]
fn unresolvable_host_is_not_transient() {
    let err = TransportError::Resolve {
        host: "no-such-host.invalid".into(),
        source: std::io::Error::other("failed to lookup address information"),
    };
    assert!(!err.is_transient());
    assert_eq!(
        err.to_string(),
        "cannot resolve host `no-such-host.invalid`: check the name, or give an IP address"
    );
}

#[tokio::test]
async fn waiting_gives_up_when_told_to() {
    bounded(async {
        let port = closed_port().await;
        let ep = endpoint(&format!("tcp:127.0.0.1:{port},reconnect"));
        let options = WaitOptions {
            initial_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(50),
            give_up_after: Some(Duration::from_millis(200)),
        };
        let mut events = Vec::new();
        let err = open_waiting(&ep, &options, |e| events.push(e.to_string()))
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransportError::WaitTimedOut { .. }),
            "{err:?}"
        );
        assert!(!err.is_transient());
        assert!(events.len() >= 2, "{events:?}");
        assert_eq!(
            events[0],
            format!("waiting for TCP 127.0.0.1:{port} to accept connections")
        );
        let cause = std::error::Error::source(&err).expect("last error as source");
        assert!(cause.to_string().contains("refused the connection"));
    })
    .await;
}

#[tokio::test]
async fn without_reconnect_open_waiting_does_not_wait() {
    bounded(async {
        let port = closed_port().await;
        let mut called = false;
        let err = open_waiting(
            &endpoint(&format!("tcp:127.0.0.1:{port}")),
            &WaitOptions::default(),
            |_| called = true,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, TransportError::ConnectionRefused { .. }));
        assert!(!called);
    })
    .await;
}

#[cfg(unix)]
mod unix {
    use super::*;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn unix_socket_open_exchanges_bytes() {
        bounded(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("com1.sock");
            let listener = UnixListener::bind(&path).unwrap();
            tokio::spawn(async move { echo(listener.accept().await.unwrap().0).await });
            let mut link = open(&endpoint(&format!("unix:{}", path.display())))
                .await
                .unwrap();
            assert_eq!(link.kind(), LinkKind::UnixSocket);
            round_trip(&mut link, b"over a unix socket").await;
        })
        .await;
    }

    /// `com:pipe,port=` names the Unix socket of the VM's COM port on Unix hosts.
    #[tokio::test]
    async fn com_pipe_opens_a_unix_socket() {
        bounded(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("vbox-com1");
            let listener = UnixListener::bind(&path).unwrap();
            tokio::spawn(async move { echo(listener.accept().await.unwrap().0).await });
            let mut link = open(&endpoint(&format!(
                "com:pipe,port={},resets=0",
                path.display()
            )))
            .await
            .unwrap();
            assert_eq!(link.peer(), format!("Unix socket {}", path.display()));
            round_trip(&mut link, b"pipe on unix").await;
        })
        .await;
    }

    #[tokio::test]
    async fn reconnect_waits_for_the_socket_to_appear() {
        bounded(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("late.sock");
            let server_path = path.clone();
            let server = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let listener = UnixListener::bind(&server_path).unwrap();
                echo(listener.accept().await.unwrap().0).await;
            });
            let ep = endpoint(&format!("com:pipe,port={},reconnect", path.display()));
            let options = WaitOptions {
                initial_delay: Duration::from_millis(25),
                max_delay: Duration::from_millis(100),
                give_up_after: None,
            };
            let started = Instant::now();
            let mut events = Vec::new();
            let mut link = open_waiting(&ep, &options, |e| {
                assert!(e.reason.is_transient());
                events.push((e.attempt, e.to_string()));
            })
            .await
            .unwrap();
            assert!(started.elapsed() >= Duration::from_millis(250));
            assert!(!events.is_empty());
            assert_eq!(
                events[0],
                (
                    1,
                    format!("waiting for Unix socket {} to appear", path.display())
                )
            );
            round_trip(&mut link, b"hello after waiting").await;
            drop(link);
            server.await.unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn dropping_open_waiting_cancels_it() {
        let dir = tempfile::tempdir().unwrap();
        let ep = endpoint(&format!(
            "unix:{},reconnect",
            dir.path().join("never").display()
        ));
        let options = WaitOptions::default();
        let waiting = open_waiting(&ep, &options, |_| {});
        let result = tokio::time::timeout(Duration::from_millis(200), waiting).await;
        assert!(result.is_err(), "still waiting when dropped");
    }

    #[tokio::test]
    async fn missing_socket_without_reconnect_suggests_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent");
        let err = open(&endpoint(&format!("com:pipe,port={}", path.display())))
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::NotFound { .. }), "{err:?}");
        assert!(err.is_transient());
        let message = err.to_string();
        assert!(
            message.starts_with(&format!(
                "Unix socket {} does not exist: is the VM running",
                path.display()
            )),
            "{message}"
        );
        assert!(
            message.contains("Add `,reconnect` to wait for it"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn stale_socket_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let err = open(&endpoint(&format!("unix:{}", path.display())))
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransportError::ConnectionRefused { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("nothing listens on it"));
    }

    #[tokio::test]
    async fn windows_pipe_name_on_unix_points_at_the_socket() {
        let err = open(&endpoint(
            r"com:pipe,port=\\.\pipe\com_1,resets=0,reconnect",
        ))
        .await
        .unwrap_err();
        assert!(matches!(err, TransportError::Unsupported { .. }), "{err:?}");
        assert!(!err.is_transient());
        let message = err.to_string();
        assert!(
            message.starts_with(
                r"cannot use named pipe \\.\pipe\com_1: `\\.\pipe\com_1` is a Windows named pipe"
            ),
            "{message}"
        );
        assert!(
            message.contains("use com:pipe,port=/path/to/socket"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn regular_file_is_not_a_socket() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let err = open(&endpoint(&format!("unix:{}", file.path().display())))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("exists but is not a socket"),
            "{err}"
        );
    }

    mod serial {
        use super::*;
        use tokio_serial::{SerialPort, SerialStream};

        /// A pty pair: the master plays the target, the slave is opened by path through
        /// `open()`. The pair's own slave handle must be dropped once `open()` holds the
        /// device, or it competes for the bytes.
        fn pty() -> (SerialStream, SerialStream, String) {
            let (master, slave) = SerialStream::pair().expect("pty pair");
            let name = slave.name().expect("slave pty has a path");
            (master, slave, name)
        }

        #[tokio::test]
        async fn serial_over_a_pty_exchanges_bytes() {
            bounded(async {
                let (mut master, slave, name) = pty();
                let mut link = open(&endpoint(&format!("com:port={name},baud=115200")))
                    .await
                    .unwrap();
                drop(slave);
                assert_eq!(link.kind(), LinkKind::Serial);
                assert_eq!(link.peer(), format!("serial port {name}"));

                link.write_all(b"\x30\x30\x30\x30 host").await.unwrap();
                let mut got = [0u8; 9];
                master.read_exact(&mut got).await.unwrap();
                assert_eq!(&got, b"0000 host");

                master.write_all(b"target bytes").await.unwrap();
                let mut got = [0u8; 12];
                link.read_exact(&mut got).await.unwrap();
                assert_eq!(&got, b"target bytes");
            })
            .await;
        }

        #[tokio::test]
        async fn serial_port_in_use_is_busy() {
            bounded(async {
                let (_master, _slave, name) = pty();
                let ep = endpoint(&format!("com:port={name},baud=19200"));
                let _first = open(&ep).await.unwrap();
                let err = open(&ep).await.unwrap_err();
                assert!(matches!(err, TransportError::Busy { .. }), "{err:?}");
                assert!(err.to_string().contains("another program has it open"));
            })
            .await;
        }

        #[tokio::test]
        async fn missing_serial_device_lists_ports() {
            let err = open(&endpoint("com:port=/dev/ttyKDPILOT404,baud=19200"))
                .await
                .unwrap_err();
            assert!(
                matches!(err, TransportError::SerialPortNotFound { .. }),
                "{err:?}"
            );
            assert!(err.is_transient());
            let message = err.to_string();
            assert!(
                message.starts_with("serial port /dev/ttyKDPILOT404 not found; "),
                "{message}"
            );
            let TransportError::SerialPortNotFound { available, .. } = &err else {
                unreachable!()
            };
            if available.is_empty() {
                assert!(
                    message.contains("this machine reports no serial ports"),
                    "{message}"
                );
            } else {
                assert!(
                    message.contains(&format!("available serial ports: {}", available.join(", "))),
                    "{message}"
                );
            }
        }

        #[tokio::test]
        async fn socket_given_as_serial_port_gets_a_hint() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("com1");
            let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
            let err = open(&endpoint(&format!("com:port={}", path.display())))
                .await
                .unwrap_err();
            assert!(
                err.to_string()
                    .contains(&format!("use com:pipe,port={}", path.display())),
                "{err}"
            );
        }
    }
}

#[cfg(windows)]
mod windows {
    use super::*;

    #[tokio::test]
    async fn missing_com_port_lists_ports() {
        for port in ["COM199", r"\\.\COM198"] {
            let err = open(&endpoint(&format!("com:port={port},baud=19200")))
                .await
                .unwrap_err();
            assert!(
                matches!(err, TransportError::SerialPortNotFound { .. }),
                "{err:?}"
            );
            assert!(
                err.to_string()
                    .starts_with(&format!("serial port {port} not found; ")),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn missing_named_pipe_is_not_found() {
        let name = format!(r"\\.\pipe\kdpilot-absent-{}", std::process::id());
        let err = open(&endpoint(&format!("com:pipe,port={name}")))
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::NotFound { .. }), "{err:?}");
        assert!(err
            .to_string()
            .starts_with(&format!("named pipe {name} does not exist")));
    }

    #[tokio::test]
    async fn unix_endpoint_is_unsupported_on_windows() {
        let err = open(&endpoint("unix:/tmp/com_1.sock")).await.unwrap_err();
        assert!(matches!(err, TransportError::Unsupported { .. }), "{err:?}");
        assert!(
            err.to_string().contains(r"use com:pipe,port=\\.\pipe\NAME"),
            "{err}"
        );
    }
}
