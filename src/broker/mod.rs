//! The broker side: the lapin connection, the SPEC §2 topology, consuming the
//! task queues, and the outbox through which every outgoing message (events,
//! `rpc://` results) is published in order, with publisher confirms.
//!
//! Owns AMQP connections and the channels of a session (the farm's probe
//! opens its own, on a session's connection, see [`crate::farm`]). It must
//! not run tasks or decide what a message means: deliveries go to the
//! worker as they are, and the worker hands back bytes to publish.
//!
//! Remote control (SPEC §6) has its own channel per session: the node's
//! pidbox queue `<node>.celery.pidbox` (exclusive, so a second worker with
//! the same node name is refused with [`BrokerError::NodeInUse`] before it
//! consumes any task), consumed without acks as kombu's pidbox does, and the
//! replies published on that same channel.
//!
//! - `connection`: connecting (TLS, frame size, timeout) and opening a
//!   session's channels, in order;
//! - `topology`: exchanges, task queues, the pidbox queue, consumers,
//!   prefetch and remote-control replies;
//! - `outbox`: the ordered outbox and its publisher;
//! - `error`: [`BrokerError`] and the reading of AMQP close reasons.
//!
//! This file holds [`Broker`], the settings every part reads.

mod connection;
mod error;
mod outbox;
mod topology;

pub use connection::{CONNECT_TIMEOUT, Session};
pub use error::{BrokerError, delivery_timeout};
pub use outbox::{Outbox, Outgoing, run_publisher};
pub use topology::{
    CONSUMER_TIMEOUT_MS, CONTROL_EXCHANGE, CONTROL_QUEUE_EXPIRES_MS, CONTROL_QUEUE_TTL_MS,
    ControlChannel, EVENT_EXCHANGE, TASK_EXCHANGE, TaskQueue, control_queue_name, publish_reply,
    set_prefetch,
};

use crate::config::{BrokerUrl, Config, QueueName};

/// How to reach the broker and what to declare there.
#[derive(Clone)]
pub struct Broker {
    url: BrokerUrl,
    tls: Option<String>,
    connection_name: String,
    queues: Vec<QueueName>,
    /// The Celery node name, `USERNAME@NODE_NAME`.
    node: String,
}

impl Broker {
    /// Reads the CA file (if any) now, so a bad path fails at start-up.
    pub fn new(config: &Config) -> Result<Self, BrokerError> {
        let tls = match &config.broker.ca_file {
            None => None,
            Some(path) => {
                Some(
                    std::fs::read_to_string(path).map_err(|source| BrokerError::CaFile {
                        path: path.display().to_string(),
                        source,
                    })?,
                )
            }
        };
        Ok(Self {
            url: config.broker.url.clone(),
            tls,
            connection_name: format!("zimfarm-worker {}", config.hostname()),
            queues: config.broker.queues.clone(),
            node: config.hostname(),
        })
    }

    /// The broker URL with its password redacted, for log lines.
    pub fn display_url(&self) -> String {
        self.url.to_string()
    }
}
