//! zimfarm-worker: the openZIM Zimfarm worker, rewritten in Rust.
//!
//! The binary (`src/main.rs`) is a thin shell over these modules; each one
//! owns one concern and says in its own doc what it must not touch.

pub mod broker;
pub mod celery;
pub mod config;
pub mod control;
pub mod dispatcher;
pub mod docker;
pub mod early;
pub mod ended;
pub mod events;
pub mod farm;
pub mod memory;
pub mod metrics;
pub mod monitor;
pub mod offliner;
pub mod ops;
pub mod pipeline;
pub mod prefetch;
pub mod progress;
#[cfg(test)]
pub(crate) mod proptest_config;
pub mod ps;
pub mod report;
pub mod retry;
pub mod runner;
pub mod scraper_net;
pub mod startup;
pub mod sweep;
pub mod taskfs;
pub mod warehouse;
pub mod worker;
