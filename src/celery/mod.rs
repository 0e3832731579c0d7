//! The Celery wire format: decoding task messages (protocol v1 and v2),
//! encoding events, `rpc://` results and Python `repr` strings.
//!
//! Owns bytes-in, bytes-out conversions only; it never opens a connection.
