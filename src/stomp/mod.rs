//! STOMP 1.2 support for the outbox delivery worker.
//!
//! * [`frame`] is a pure codec (no I/O): [`frame::Frame`], [`frame::encode`] and the incremental
//!   [`frame::Decoder`].
//! * [`client`] is a small synchronous client over `std::net::TcpStream`, optionally inside
//!   TLS (rustls, [`client::TlsConfig`]): connect/CONNECTED handshake, heart-beats, pipelined
//!   SENDs with receipts ([`client::send_batch`]).
//!
//! This module tree only depends on `std`, `thiserror` and `rustls` (ring provider; PEM
//! parsing through its re-exported `pki_types`), so it can be included from a plain Rust
//! program with `#[path = ".../stomp/mod.rs"] mod stomp;`.

pub mod client;
pub mod frame;
