//! What can go wrong talking to the broker, and how a lapin error is told
//! apart: a refused login or vhost, a node name already in use, a delivery
//! acknowledgement that timed out.
//!
//! Owns [`BrokerError`] and the reading of AMQP close reasons. It must not
//! connect, retry or log: callers decide what an error means for them.

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

use super::control_queue_name;

/// Everything that can go wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot read BROKER_CA_FILE {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot connect to the broker at {url}: {source}{hint}")]
    Connect {
        url: String,
        source: lapin::Error,
        /// What to do, when the error says it (e.g. an untrusted certificate).
        hint: &'static str,
    },
    #[error(
        "the broker at {url} did not answer within {secs} s; check the host, port and firewall"
    )]
    ConnectTimeout { url: String, secs: u64 },
    #[error("broker refused {what}: {source}")]
    Setup { what: String, source: lapin::Error },
    /// The broker turned the login down (403 ACCESS_REFUSED) or does not
    /// let this user into the vhost (530 NOT_ALLOWED): configuration, not
    /// an outage.
    #[error(
        "the broker at {url} refused this worker: {reason}; check USERNAME and PASSWORD (or the \
         user, password and vhost in BROKER_URL)"
    )]
    Refused { url: String, reason: String },
    /// The node's pidbox queue is held by another connection (405
    /// RESOURCE_LOCKED on the exclusive queue): another worker runs with the
    /// same node name.
    #[error(
        "another worker named {node} is already connected to the broker (its remote-control \
         queue {queue} is locked by another connection); each worker needs its own NODE_NAME: \
         stop the other worker or change NODE_NAME",
        queue = control_queue_name(node)
    )]
    NodeInUse { node: String },
}

impl BrokerError {
    /// Whether retrying cannot help until the configuration changes.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Refused { .. } | Self::CaFile { .. })
    }
}

/// The broker's reason when it refused the login or the vhost.
pub(super) fn refusal(error: &lapin::Error) -> Option<String> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e)
            if matches!(
                e.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                    | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
            ) =>
        {
            Some(e.get_message().to_string())
        }
        _ => None,
    }
}

/// The broker's reason, when it closed a consuming channel because a
/// delivery stayed unacked past its `consumer_timeout` (RabbitMQ 3.8.15 and
/// later: PRECONDITION_FAILED, "delivery acknowledgement on channel N timed
/// out"). Every unacked delivery of that channel is requeued.
pub fn delivery_timeout(error: &lapin::Error) -> Option<String> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e)
            if matches!(
                e.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
            ) =>
        {
            let message = e.get_message().to_string();
            (message.contains("delivery acknowledgement") && message.contains("timed out"))
                .then_some(message)
        }
        _ => None,
    }
}

/// Whether the broker refused an exclusive queue held by another connection.
pub(super) fn is_resource_locked(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(e)
            if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED))
    )
}

/// Maps a lapin error to [`BrokerError::Setup`] about `what`.
pub(super) fn setup(what: &str) -> impl FnOnce(lapin::Error) -> BrokerError {
    let what = what.to_owned();
    move |source| BrokerError::Setup { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delivery_timeout_close_is_told_from_other_closes() {
        use lapin::protocol::AMQPError;
        let close = |kind, text: &str| {
            lapin::Error::from(lapin::ErrorKind::ProtocolError(AMQPError::new(
                kind,
                text.into(),
            )))
        };
        // RabbitMQ 3.10.8's own words.
        let text = "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. \
                    Timeout value used: 60000 ms. This timeout value can be configured, see \
                    consumers doc guide to learn more";
        let timeout = close(AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED), text);
        assert_eq!(delivery_timeout(&timeout).as_deref(), Some(text));
        let other = close(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'small'",
        );
        assert_eq!(delivery_timeout(&other), None);
        let hard = close(AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED), text);
        assert_eq!(delivery_timeout(&hard), None);
    }
}
