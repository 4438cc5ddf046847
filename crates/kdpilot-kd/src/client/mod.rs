//! Async host-side client.
