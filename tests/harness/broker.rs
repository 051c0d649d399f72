//! The broker side of the tests (filled in with the STOMP client).
