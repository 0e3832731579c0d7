//! The node's pidbox queue for one broker session: reading requests,
//! keeping Celery's clock, replying on the same channel, and reopening the
//! channel when the broker closed it.
//!
//! Owns the AMQP side of remote control only: what a request does is
//! [`super::dispatch`]'s business; the connection itself is the session
//! loop's.

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel, Connection};
use tokio_util::sync::CancellationToken;

use super::{After, ControlledWorker};
use crate::broker::{Broker, BrokerError, ControlChannel, publish_reply};
use crate::celery::{decode_control, encode_control_reply, log_text};
use crate::retry::Retry;

/// The remote-control side of one broker session.
pub struct ControlSession {
    pub broker: Broker,
    /// To reopen the control channel when a bad request closed it.
    pub connection: Arc<Connection>,
    pub control: ControlChannel,
}

/// Serves remote control for one broker session until `stop` fires: reads
/// the node's pidbox queue, runs each request meant for this node in turn,
/// and replies on the same channel. A channel closed by the broker (e.g. a
/// reply to an exchange it refuses) is reopened while the connection lives;
/// the connection itself is the session loop's business.
pub async fn serve<W: ControlledWorker>(
    worker: W,
    session: ControlSession,
    stop: CancellationToken,
) {
    let ControlSession {
        broker,
        connection,
        mut control,
    } = session;
    // Reply exchanges declared on the current channel (kombu declares one
    // before every reply; once per channel is enough).
    let mut declared = HashSet::new();
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            next = control.consumer.next() => next,
        };
        match next {
            Some(Ok(delivery)) => {
                match handle(&worker, &control.channel, &mut declared, delivery).await {
                    Ok(After::Shutdown) => worker.shutdown(),
                    Ok(After::Nothing) => {}
                    Err(error) => {
                        tracing::warn!(%error, "could not send a remote-control reply");
                    }
                }
                if control.channel.status().connected() {
                    continue;
                }
            }
            Some(Err(error)) => tracing::debug!(%error, "remote-control channel lost"),
            None => tracing::debug!("remote-control consumer ended"),
        }
        match reopen(&worker, &broker, &connection, &stop).await {
            Some(reopened) => {
                control = reopened;
                declared.clear();
            }
            None => return,
        }
    }
}

/// Reopens the control channel after the broker closed it, with backoff.
/// `None` when `stop` fired, or when there is nothing to do until it does
/// (the connection is gone, or another worker took the node's name).
async fn reopen<W: ControlledWorker>(
    worker: &W,
    broker: &Broker,
    connection: &Connection,
    stop: &CancellationToken,
) -> Option<ControlChannel> {
    let mut retry = Retry::broker();
    loop {
        if !connection.status().connected() {
            // The session loop sees it too, reconnects, and stops this task.
            stop.cancelled().await;
            return None;
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(retry.delay()) => {}
        }
        match broker.open_control(connection).await {
            Ok(control) => {
                tracing::info!("remote-control channel reopened");
                return Some(control);
            }
            Err(error @ BrokerError::NodeInUse { .. }) => {
                tracing::error!(%error);
                worker.node_in_use();
                stop.cancelled().await;
                return None;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot reopen the remote-control channel; retrying");
            }
        }
    }
}

/// Runs one pidbox message and sends its reply. Errors are the reply's
/// publishing errors; a malformed request is only logged.
async fn handle<W: ControlledWorker>(
    worker: &W,
    channel: &Channel,
    declared: &mut HashSet<String>,
    delivery: Delivery,
) -> Result<After, lapin::Error> {
    let request = match decode_control(&delivery.data) {
        Ok(request) => request,
        Err(error) => {
            tracing::warn!(%error, bytes = delivery.data.len(), "ignoring a malformed remote-control message");
            return Ok(After::Nothing);
        }
    };
    let events = worker.events();
    // As Celery's pidbox: forward the clock, merge the sender's (a sender
    // far ahead is not followed: see `LamportClock::adjust`).
    match header_u64(&delivery.properties, "clock") {
        Some(theirs) => events.clock().adjust(theirs),
        None => events.clock().forward(),
    };
    let hostname = events.hostname();
    if !request.is_for(hostname) {
        return Ok(After::Nothing);
    }
    let addressed = request.names(hostname);
    let (reply, after) =
        super::dispatch(worker, &request.method, &request.arguments, addressed).await;
    tracing::debug!(method = %log_text(&request.method), reply = %log_text(&reply.to_string()), "remote-control command");
    if let Some(to) = &request.reply_to
        && (to.exchange.len() > 255 || to.routing_key.len() > 255)
    {
        // AMQP short strings hold 255 bytes; lapin's `ShortString::from`
        // panics on longer ones, which killed the worker.
        tracing::warn!(
            method = %log_text(&request.method),
            "remote-control reply_to names an exchange or routing key over 255 bytes; no reply sent"
        );
    } else if let Some(to) = &request.reply_to {
        let ticket = request.ticket.as_deref().unwrap_or_default();
        let (body, properties) =
            encode_control_reply(hostname, &reply, ticket, events.clock().forward());
        publish_reply(
            channel,
            declared,
            &to.exchange,
            &to.routing_key,
            &body,
            properties,
        )
        .await?;
    }
    Ok(after)
}

/// A numeric AMQP header, as kombu sends `clock`.
fn header_u64(properties: &BasicProperties, name: &str) -> Option<u64> {
    let value = properties.headers().as_ref()?.inner().get(name)?;
    match *value {
        AMQPValue::ShortShortInt(v) => u64::try_from(v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(v)),
        AMQPValue::ShortInt(v) => u64::try_from(v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(v)),
        AMQPValue::LongInt(v) => u64::try_from(v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(v)),
        AMQPValue::LongLongInt(v) => u64::try_from(v).ok(),
        _ => None,
    }
}
