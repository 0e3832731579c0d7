//! Settings of the whole RabbitMQ broker that a test changes for its own
//! length: the delivery timeout (`consumer_timeout`, and how often channels
//! check it) and the memory high watermark (an alarm that blocks every
//! publishing connection). Every other test binary's connections feel them,
//! so the tests of one binary that change them run one at a time (a lock of
//! the process: cargo runs test binaries one after another), and every
//! setting comes back when its guard is dropped, however the test ends.
//! `scripts/test-env.sh` resets the watermark at start too.

use std::sync::{Mutex, MutexGuard};

use super::rabbitmqctl;

/// The watermark RabbitMQ starts with, restored after an alarm.
pub const NORMAL_WATERMARK: &str = "0.4";

static SERIAL: Mutex<()> = Mutex::new(());

fn rabbit_eval(expr: &str) -> String {
    rabbitmqctl(&["eval", expr])
}

/// The broker's delivery timeout and how often its channels check it,
/// lowered while alive and restored when dropped; held by one test at a
/// time (it also serialises [`BrokerWide::memory_alarm`]).
pub struct BrokerWide {
    saved: Vec<(&'static str, String)>,
    _serial: MutexGuard<'static, ()>,
}

impl BrokerWide {
    /// Takes the broker for this test, its settings as they are.
    pub fn take() -> Self {
        Self {
            saved: Vec::new(),
            _serial: SERIAL.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Takes the broker with a delivery timeout of `timeout_ms`, checked
    /// every `tick_ms`.
    pub fn delivery_timeout(timeout_ms: u64, tick_ms: u64) -> Self {
        let mut this = Self::take();
        for key in ["consumer_timeout", "channel_tick_interval"] {
            this.saved.push((
                key,
                rabbit_eval(&format!("application:get_env(rabbit, {key}).")),
            ));
        }
        rabbit_eval(&format!(
            "application:set_env(rabbit, consumer_timeout, {timeout_ms})."
        ));
        rabbit_eval(&format!(
            "application:set_env(rabbit, channel_tick_interval, {tick_ms})."
        ));
        this
    }

    /// Raises a memory alarm (publishers blocked) until the returned guard
    /// is dropped.
    pub fn memory_alarm(&self) -> MemoryAlarm<'_> {
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.000001"]);
        MemoryAlarm { _broker: self }
    }
}

impl Drop for BrokerWide {
    fn drop(&mut self) {
        for (key, was) in &self.saved {
            // `{ok,1800000}` or `undefined`.
            let expr = match was.strip_prefix("{ok,").and_then(|v| v.strip_suffix('}')) {
                Some(value) => format!("application:set_env(rabbit, {key}, {value})."),
                None => format!("application:unset_env(rabbit, {key})."),
            };
            let _ = std::process::Command::new("rabbitmqctl")
                .args(["eval", &expr])
                .output();
        }
    }
}

/// A memory alarm of the broker, cleared when dropped.
pub struct MemoryAlarm<'a> {
    _broker: &'a BrokerWide,
}

impl Drop for MemoryAlarm<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", NORMAL_WATERMARK])
            .output();
    }
}
