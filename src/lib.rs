//! zimfarm-worker: the openZIM Zimfarm worker, rewritten in Rust.
//!
//! The binary (`src/main.rs`) is a thin shell over these modules; each one
//! owns one concern and says in its own doc what it must not touch.

pub mod celery;
