//! Connection-string parsing: kd's `-k` strings pasted verbatim, round trips, and errors.

use std::path::PathBuf;

use kdpilot_transport::{Endpoint, EndpointKind, ParseEndpointError, ACCEPTED_FORMS, DEFAULT_BAUD};

fn parse(s: &str) -> Endpoint {
    s.parse()
        .unwrap_or_else(|e| panic!("`{s}` should parse, got: {e}"))
}

fn parse_err(s: &str) -> ParseEndpointError {
    match s.parse::<Endpoint>() {
        Ok(e) => panic!("`{s}` should not parse, got {e:?}"),
        Err(e) => e,
    }
}

/// (input, canonical Display)
const ACCEPTED: &[(&str, &str)] = &[
    ("com:port=COM1,baud=19200", "com:port=COM1,baud=19200"),
    ("com:baud=19200,port=COM1", "com:port=COM1,baud=19200"),
    ("COM:PORT=COM1,BAUD=19200", "com:port=COM1,baud=19200"),
    (
        "com:port=/dev/ttyS0,baud=115200",
        "com:port=/dev/ttyS0,baud=115200",
    ),
    (
        r"com:port=\\.\COM12,baud=115200",
        r"com:port=\\.\COM12,baud=115200",
    ),
    ("com:port=com2", "com:port=com2,baud=115200"),
    (
        "  -k com:port=COM1,baud=19200  ",
        "com:port=COM1,baud=19200",
    ),
    (
        "com:port=COM1,baud=19200,resets=3",
        "com:port=COM1,baud=19200,resets=3",
    ),
    (
        "com:port=/dev/ttyUSB0,reconnect",
        "com:port=/dev/ttyUSB0,baud=115200,reconnect",
    ),
    (
        r"com:pipe,port=\\.\pipe\com_1,resets=0,reconnect",
        r"com:pipe,port=\\.\pipe\com_1,resets=0,reconnect",
    ),
    (
        r"com:reconnect,resets=0,port=\\.\pipe\com_1,pipe",
        r"com:pipe,port=\\.\pipe\com_1,resets=0,reconnect",
    ),
    (
        r"com:pipe,port=\\VMHost\pipe\PipeName",
        r"com:pipe,port=\\VMHost\pipe\PipeName",
    ),
    // VirtualBox guides add baud= to pipes; a pipe has no line rate, so it is dropped.
    (
        r"com:pipe,port=\\.\pipe\com_1,baud=115200",
        r"com:pipe,port=\\.\pipe\com_1",
    ),
    (
        "com:pipe,port=/tmp/vbox-com1,reconnect",
        "com:pipe,port=/tmp/vbox-com1,reconnect",
    ),
    ("com:ipport=4445,port=127.0.0.1", "tcp:127.0.0.1:4445"),
    ("com:port=[::1],ipport=4445", "tcp:[::1]:4445"),
    ("tcp:127.0.0.1:4445", "tcp:127.0.0.1:4445"),
    (
        "tcp:localhost:4445,reconnect",
        "tcp:localhost:4445,reconnect",
    ),
    ("TCP:[::1]:4445,resets=0", "tcp:[::1]:4445,resets=0"),
    ("unix:/tmp/qemu-com1.sock", "unix:/tmp/qemu-com1.sock"),
    (
        "unix:/tmp/qemu com1.sock,reconnect",
        "unix:/tmp/qemu com1.sock,reconnect",
    ),
    ("COM3", "com:port=COM3,baud=115200"),
    (r"\\.\COM12", r"com:port=\\.\COM12,baud=115200"),
    ("/dev/ttyUSB0", "com:port=/dev/ttyUSB0,baud=115200"),
    (r"\\.\pipe\com_1", r"com:pipe,port=\\.\pipe\com_1"),
    ("com:port=COM1,,baud=19200,", "com:port=COM1,baud=19200"),
];

#[test]
fn accepted_strings_parse_to_their_canonical_form_and_round_trip() {
    for (input, canonical) in ACCEPTED {
        let endpoint = parse(input);
        assert_eq!(endpoint.to_string(), *canonical, "Display of `{input}`");
        assert_eq!(parse(canonical), endpoint, "round trip of `{input}`");
    }
}

#[test]
fn serial_endpoint_exposes_baud_and_line_rate() {
    let e = parse("com:port=COM1,baud=19200");
    assert_eq!(
        e.kind(),
        &EndpointKind::Serial {
            port: "COM1".into(),
            baud: 19200
        }
    );
    assert_eq!(e.baud(), Some(19200));
    assert_eq!(e.line_rate_bytes_per_sec(), Some(1920));
    assert_eq!(e.resets(), None);
    assert!(!e.reconnect());
    assert_eq!(e.address(), "COM1");
    assert_eq!(e.description(), "serial port COM1");

    assert_eq!(parse("COM3").baud(), Some(DEFAULT_BAUD));
    assert_eq!(DEFAULT_BAUD, 115_200);
}

#[test]
fn pipe_endpoint_has_options_and_no_line_rate() {
    let e = parse(r"com:pipe,port=\\.\pipe\com_1,resets=0,reconnect");
    assert_eq!(
        e.kind(),
        &EndpointKind::Pipe {
            path: r"\\.\pipe\com_1".into()
        }
    );
    assert_eq!(e.baud(), None);
    assert_eq!(e.line_rate_bytes_per_sec(), None);
    assert_eq!(e.resets(), Some(0));
    assert!(e.reconnect());
    assert_eq!(e.address(), r"\\.\pipe\com_1");
}

#[test]
fn socket_endpoints() {
    let e = parse("tcp:[::1]:4445");
    assert_eq!(
        e.kind(),
        &EndpointKind::Tcp {
            host: "::1".into(),
            port: 4445
        }
    );
    assert_eq!(e.address(), "[::1]:4445");
    assert_eq!(e.description(), "TCP [::1]:4445");
    assert_eq!(e.baud(), None);

    let e = parse("unix:/run/vm/com1,resets=5");
    assert_eq!(
        e.kind(),
        &EndpointKind::Unix {
            path: PathBuf::from("/run/vm/com1")
        }
    );
    assert_eq!(e.resets(), Some(5));
}

#[test]
fn builders_round_trip() {
    let e = Endpoint::new(EndpointKind::Tcp {
        host: "10.0.0.2".into(),
        port: 50000,
    })
    .with_resets(Some(0))
    .with_reconnect(true);
    assert_eq!(e.to_string(), "tcp:10.0.0.2:50000,resets=0,reconnect");
    assert_eq!(parse(&e.to_string()), e);
    assert!(!e.clone().with_reconnect(false).reconnect());
}

/// (input, a piece the message must contain)
const REJECTED: &[(&str, &str)] = &[
    ("", "empty connection string"),
    ("   ", "empty connection string"),
    ("bogus", "`bogus` is not a connection string kdpilot understands"),
    ("/tmp/some.sock", "is not a connection string"),
    ("serial:COM1", "is not a connection string"),
    ("com:port=COM1,speed=9600", "unknown key `speed` in a `com:` connection string (accepted: port=, baud=, pipe, ipport=, resets=, reconnect)"),
    ("com:port=COM1,Parity=none", "unknown key `Parity`"),
    ("tcp:127.0.0.1:4445,baud=9600", "unknown key `baud` in a `tcp:` connection string (accepted: resets=, reconnect)"),
    ("unix:/tmp/x,nodelay", "unknown key `nodelay` in a `unix:`"),
    ("com:baud=19200", "`com:` needs port="),
    ("com:pipe,reconnect", "`com:` needs port="),
    ("com:port=COM1,baud=fast", "invalid baud=`fast`: expected a baud rate such as 19200 or 115200"),
    ("com:port=COM1,baud=0", "invalid baud=`0`"),
    ("com:port=COM1,baud", "`baud` needs a value, e.g. baud=115200"),
    ("com:port=", "`port` needs a value"),
    ("com:port=COM1,resets=-1", "invalid resets=`-1`"),
    ("com:port=COM1,reconnect=yes", "`reconnect` is a flag and takes no value"),
    ("com:port=COM1,port=COM2", "`port` is given twice"),
    ("com:port=COM1,reconnect,reconnect", "`reconnect` is given twice"),
    ("com:pipe,ipport=4445,port=x", "`pipe` and `ipport=` cannot be combined"),
    ("com:ipport=0,port=x", "invalid ipport=`0`"),
    ("com:ipport=70000,port=x", "invalid ipport=`70000`"),
    ("tcp:4445", "invalid tcp: address `4445`: expected HOST:PORT"),
    ("tcp:::1:4445", "put IPv6 addresses in brackets"),
    ("tcp:[::1]4445", "expected HOST:PORT"),
    ("tcp:host:0", "the port must be a number from 1 to 65535"),
    ("tcp::4445", "expected HOST:PORT"),
    ("unix:", "the socket path is missing"),
    ("net:port=50000,key=1.2.3.4", "KDNET (`net:`) is not supported yet; use a serial/pipe connection"),
    ("NET:port=50000,key=1.2.3.4,target=10.0.0.2", "KDNET"),
    ("usb:targetname=dbg", "kd's `usb:` connection is not supported; use a serial/pipe connection"),
    ("1394:channel=10", "kd's `1394:` connection is not supported"),
    ("com:modem", "kd's `com:modem` connection is not supported"),
    ("-kl", "local kernel debugging"),
];

#[test]
fn rejected_strings_say_why() {
    for (input, expected) in REJECTED {
        let message = parse_err(input).to_string();
        assert!(
            message.contains(expected),
            "error for `{input}`:\n{message}\nshould contain:\n{expected}"
        );
    }
}

#[test]
fn unrecognised_strings_list_the_accepted_forms() {
    let message = parse_err("COM").to_string();
    assert_eq!(
        message,
        r"`COM` is not a connection string kdpilot understands
accepted connection strings (kd's -k syntax, pasted verbatim, plus tcp: and unix:):
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
  reconnect (wait for the port, pipe or socket to appear, and reopen it when it goes away)"
    );
    assert!(message.ends_with(ACCEPTED_FORMS));
}

#[test]
fn every_example_in_the_accepted_forms_parses() {
    for line in ACCEPTED_FORMS.lines().skip(1) {
        let line = line.trim();
        if line.starts_with("options") || line.starts_with("reconnect") {
            continue;
        }
        // Columns are separated by runs of spaces; descriptions follow the examples.
        for example in line.split("   ").map(str::trim).filter(|s| !s.is_empty()) {
            if example.contains(' ') {
                break; // the description column
            }
            parse(example);
        }
    }
}

#[test]
fn kdnet_error_is_its_own_variant() {
    assert_eq!(
        parse_err("net:port=50000,key=a.b.c.d"),
        ParseEndpointError::Kdnet
    );
}
