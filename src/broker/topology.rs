//! The SPEC §2 topology and the consumers on it: the `offliner` and
//! `celeryev` exchanges, the task queues (declared, bound, consumed and
//! cancelled one by one for remote control and while every slot is busy),
//! the task channel's watch queue, the node's pidbox queue (SPEC §6),
//! consumer tags and arguments, the channel's prefetch and the publishing
//! of remote-control replies.
//!
//! Owns what is declared on the broker and how it is consumed. It must not
//! open connections (see `connection`) nor read or build messages.

use std::collections::HashSet;

use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, Consumer, ExchangeKind};

use super::Broker;
use super::error::{BrokerError, is_resource_locked, setup};

/// The exchange the dispatcher sends tasks to (SPEC §2).
pub const TASK_EXCHANGE: &str = "offliner";
/// The exchange Celery events go to (SPEC §5).
pub const EVENT_EXCHANGE: &str = "celeryev";
/// The fanout exchange remote-control requests are broadcast on (SPEC §6).
pub const CONTROL_EXCHANGE: &str = "celery.pidbox";
/// Celery's `control_queue_ttl`: a request left unread in a node's pidbox
/// queue is dropped after this long (ms).
pub const CONTROL_QUEUE_TTL_MS: i32 = 300_000;
/// Celery's `control_queue_expires`: a node's pidbox queue is deleted this
/// long (ms) after its last consumer left.
pub const CONTROL_QUEUE_EXPIRES_MS: i32 = 10_000;

/// The name of a node's own pidbox queue, as kombu's `Mailbox` names it.
pub fn control_queue_name(node: &str) -> String {
    format!("{node}.celery.pidbox")
}

/// A task queue to consume and the exchange it is bound to: the part of
/// kombu's `Queue` this worker uses. Queues and exchanges are durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskQueue {
    pub name: String,
    /// The exchange it is bound to; empty: the default exchange only.
    pub exchange: String,
    /// `direct`, `topic`, `fanout` or `headers`.
    pub exchange_type: String,
    pub routing_key: String,
}

impl TaskQueue {
    /// A Zimfarm queue: bound to the `offliner` topic exchange with routing
    /// key = its name (SPEC §2).
    pub fn zimfarm(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            exchange: TASK_EXCHANGE.to_owned(),
            exchange_type: "topic".to_owned(),
            routing_key: name.to_owned(),
        }
    }

    fn exchange_kind(&self) -> ExchangeKind {
        match self.exchange_type.as_str() {
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "headers" => ExchangeKind::Headers,
            "topic" => ExchangeKind::Topic,
            other => ExchangeKind::Custom(other.to_owned()),
        }
    }
}

/// The node's remote-control channel and the consumer of its pidbox queue.
pub struct ControlChannel {
    pub channel: Channel,
    pub consumer: Consumer,
}

/// Declares the durable topic exchanges tasks and events go to.
pub(super) async fn declare_exchanges(channel: &Channel) -> Result<(), BrokerError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for (name, what) in [
        (TASK_EXCHANGE, "exchange offliner"),
        (EVENT_EXCHANGE, "exchange celeryev"),
    ] {
        channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(setup(what))?;
    }
    Ok(())
}

impl Broker {
    /// Opens the remote-control channel: declares the `celery.pidbox`
    /// fanout exchange and this node's pidbox queue (exclusive, auto-delete,
    /// with Celery's message TTL and expiry) bound to it, and consumes it
    /// without acks, as kombu's pidbox `Node` does.
    pub async fn open_control(
        &self,
        connection: &Connection,
    ) -> Result<ControlChannel, BrokerError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(setup("a channel"))?;
        channel
            .exchange_declare(
                CONTROL_EXCHANGE.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(setup("exchange celery.pidbox"))?;
        let queue = control_queue_name(&self.node);
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-message-ttl".into(),
            AMQPValue::LongInt(CONTROL_QUEUE_TTL_MS),
        );
        arguments.insert(
            "x-expires".into(),
            AMQPValue::LongInt(CONTROL_QUEUE_EXPIRES_MS),
        );
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        match channel
            .queue_declare(queue.as_str().into(), options, arguments)
            .await
        {
            Ok(_) => {}
            Err(e) if is_resource_locked(&e) => {
                return Err(BrokerError::NodeInUse {
                    node: self.node.clone(),
                });
            }
            Err(e) => return Err(setup(&format!("queue {queue}"))(e)),
        }
        channel
            .queue_bind(
                queue.as_str().into(),
                CONTROL_EXCHANGE.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(setup(&format!("binding of queue {queue}")))?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                self.consumer_tag(&queue).into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(setup(&format!("consuming queue {queue}")))?;
        Ok(ControlChannel { channel, consumer })
    }

    /// Declares a task queue and its exchange, and binds them, on `channel`
    /// (a refusal closes that channel: see [`Broker::declare_queue_apart`]).
    pub async fn declare_queue(
        &self,
        channel: &Channel,
        queue: &TaskQueue,
    ) -> Result<(), BrokerError> {
        let name = queue.name.as_str();
        if !queue.exchange.is_empty() {
            channel
                .exchange_declare(
                    queue.exchange.as_str().into(),
                    queue.exchange_kind(),
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(setup(&format!("exchange {}", queue.exchange)))?;
        }
        channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(setup(&format!("queue {name}")))?;
        if !queue.exchange.is_empty() {
            channel
                .queue_bind(
                    name.into(),
                    queue.exchange.as_str().into(),
                    queue.routing_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(setup(&format!("binding of queue {name}")))?;
        }
        Ok(())
    }

    /// [`Broker::declare_queue`] on a channel of its own, closed afterwards:
    /// a queue the broker refuses (declared elsewhere with other arguments,
    /// exclusive to another connection...) then costs that channel only,
    /// not the one consuming tasks.
    pub async fn declare_queue_apart(
        &self,
        connection: &Connection,
        queue: &TaskQueue,
    ) -> Result<(), BrokerError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(setup("a channel"))?;
        let declared = self.declare_queue(&channel, queue).await;
        if channel.status().connected() {
            let _ = channel.close(200, "queue declared".into()).await;
        }
        declared
    }

    /// Starts consuming a (declared) task queue on `channel`, with acks,
    /// asking for [`CONSUMER_TIMEOUT_MS`] as this consumer's delivery
    /// timeout.
    pub async fn consume_queue(
        &self,
        channel: &Channel,
        queue: &str,
    ) -> Result<Consumer, BrokerError> {
        channel
            .basic_consume(
                queue.into(),
                self.consumer_tag(queue).into(),
                BasicConsumeOptions::default(),
                task_consumer_arguments(),
            )
            .await
            .map_err(setup(&format!("consuming queue {queue}")))
    }

    /// Consumes, on `channel`, an exclusive queue of its own that nothing
    /// is routed to (auto-delete): its consumer delivers nothing, but its
    /// stream carries the channel's end (the connection lost, or the
    /// channel closed by the broker, with the broker's reason) to a session
    /// that consumes no task queue while every slot is busy. Named as
    /// Celery's own event receivers name theirs (`celeryev.<uuid>`), not
    /// by the server (`amq.gen-…`): a farm account whose permissions allow
    /// what a Celery worker declares allows this one.
    pub async fn watch_channel(&self, channel: &Channel) -> Result<Consumer, BrokerError> {
        let name = format!("celeryev.{}", uuid::Uuid::new_v4());
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(setup("the task channel's watch queue"))?;
        channel
            .basic_consume(
                name.as_str().into(),
                self.consumer_tag(&name).into(),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(setup("consuming the task channel's watch queue"))
    }

    /// Stops consuming a task queue on `channel`; its consumer's stream
    /// ends. Unacked messages stay with this worker until acked.
    pub async fn cancel_queue(&self, channel: &Channel, queue: &str) -> Result<(), BrokerError> {
        channel
            .basic_cancel(
                self.consumer_tag(queue).into(),
                BasicCancelOptions::default(),
            )
            .await
            .map_err(setup(&format!("cancelling the consumer of queue {queue}")))
    }

    /// The consumer tag of a queue: the connection name and the queue name.
    fn consumer_tag(&self, queue: &str) -> String {
        consumer_tag(&self.connection_name, queue)
    }
}

/// The delivery acknowledgement timeout the worker asks for on its own
/// task consumers (`x-consumer-timeout`, ms): 14 days. RabbitMQ 3.11.15,
/// 3.12 and later apply it to this consumer only, over the broker's
/// `consumer_timeout` (30 min by default), without changing the queue,
/// which others declared; older brokers ignore the argument (seen with
/// 3.10.8). A task that outlives even this is held by the farm (see
/// [`crate::farm`]).
pub const CONSUMER_TIMEOUT_MS: i64 = 14 * 24 * 3600 * 1000;

/// The arguments of a task consumer.
fn task_consumer_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-consumer-timeout".into(),
        AMQPValue::LongLongInt(CONSUMER_TIMEOUT_MS),
    );
    arguments
}

/// `<connection name>.<queue>`, the connection name cut so the tag fits
/// the 255 bytes of an AMQP short string (lapin's `ShortString::from`
/// panics on longer ones, killing the worker); the queue name, unique on
/// the channel, is kept whole.
fn consumer_tag(connection_name: &str, queue: &str) -> String {
    const MAX: usize = 255;
    if queue.len() >= MAX - 1 {
        return queue.to_owned();
    }
    let prefix = connection_name.replace(' ', "-");
    let mut cut = prefix.len().min(MAX - 1 - queue.len());
    while !prefix.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}.{queue}", &prefix[..cut])
}

/// Publishes a remote-control reply on the control channel, declaring its
/// exchange first as kombu does (direct, transient) unless `declared` says
/// it was declared on this channel already.
pub async fn publish_reply(
    channel: &Channel,
    declared: &mut HashSet<String>,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), lapin::Error> {
    if !exchange.is_empty() && !declared.contains(exchange) {
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        declared.insert(exchange.to_owned());
    }
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await?;
    Ok(())
}

/// Changes a consuming channel's prefetch (one message per free slot, plus
/// one per unacked message that holds no slot).
pub async fn set_prefetch(channel: &Channel, prefetch: u16) -> Result<(), lapin::Error> {
    channel
        .basic_qos(prefetch, BasicQosOptions { global: true })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_tags_fit_an_amqp_short_string() {
        let long_host = format!("zimfarm-worker {}@{}", "u".repeat(177), "p".repeat(63));
        assert_eq!(
            consumer_tag("zimfarm-worker a@b", "small"),
            "zimfarm-worker-a@b.small"
        );
        for queue in [
            "small".to_owned(),
            control_queue_name(&long_host[15..]),
            "q".repeat(254),
            "q".repeat(255),
        ] {
            let tag = consumer_tag(&long_host, &queue);
            assert!(tag.len() <= 255, "{} bytes", tag.len());
            assert!(tag.ends_with(&queue));
        }
        assert!(consumer_tag(&"é".repeat(200), "small").len() <= 255);
    }
}
