//! One live connection to the broker: connecting (with the TLS trust of
//! BROKER_CA_FILE, the broker's own frame size and a timeout), the channels a
//! session needs (one consuming, one publishing in confirm mode), and the
//! order in which a session is set up.
//!
//! Owns the lapin `Connection` and its opening. It must not decide what is
//! declared or consumed beyond calling the topology in its order, nor
//! publish anything.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::SelectAll;
use lapin::options::ConfirmSelectOptions;
use lapin::tcp::OwnedTLSConfig;
use lapin::types::LongString;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};

use super::Broker;
use super::error::{BrokerError, refusal, setup};
use super::topology::{ControlChannel, TaskQueue, declare_exchanges, set_prefetch};

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

impl Broker {
    /// Connects, declares the topology and opens the channels a session
    /// needs: one consuming the configured task queues and one publishing
    /// (in confirm mode); no remote control (see [`Broker::connect_with`]),
    /// so it works beside a running worker of this node.
    pub async fn connect(&self, prefetch: u16) -> Result<Session, BrokerError> {
        let queues: Vec<TaskQueue> = self
            .queues
            .iter()
            .map(|q| TaskQueue::zimfarm(q.as_str()))
            .collect();
        self.open_session(prefetch, &queues, true, false).await
    }

    /// For `check`: connects and declares the exchanges and the task
    /// queues (so the vhost's permissions are exercised), then closes,
    /// having consumed nothing and without the control queue, which a
    /// running worker of this node holds exclusively.
    pub async fn check(&self) -> Result<(), BrokerError> {
        let session = self.open_session(1, &[], true, false).await?;
        let mut result = Ok(());
        for queue in &self.queues {
            result = self
                .declare_queue(
                    &session.consume_channel,
                    &TaskQueue::zimfarm(queue.as_str()),
                )
                .await;
            if result.is_err() {
                break;
            }
        }
        session.close().await;
        result
    }

    /// The worker's session: [`Broker::connect`] declaring `queues`, and
    /// consuming them if `consume` (a node whose every slot is busy takes
    /// nothing), plus the consuming channel's watch and the remote-control
    /// channel. The node's pidbox queue
    /// is declared before any task queue is consumed, so a worker whose
    /// node name is taken ([`BrokerError::NodeInUse`]) never takes a task.
    pub async fn connect_with(
        &self,
        prefetch: u16,
        queues: &[TaskQueue],
        consume: bool,
    ) -> Result<Session, BrokerError> {
        self.open_session(prefetch, queues, consume, true).await
    }

    async fn open_session(
        &self,
        prefetch: u16,
        queues: &[TaskQueue],
        consume: bool,
        control: bool,
    ) -> Result<Session, BrokerError> {
        let props = ConnectionProperties::default()
            .with_connection_name(LongString::from(self.connection_name.clone()));
        let url = self.display_url();
        let uri = self.url.uri().clone();
        // The broker's own frame size (RabbitMQ's default: 128 KiB), unless
        // BROKER_URL says `?frame_max=`. Not a smaller one, though lapin
        // keeps two buffers of 32 frames each (8 MiB at 128 KiB): a
        // message's properties and headers travel in one frame, which the
        // broker sends whatever size the consumer asked for, and lapin
        // drops the connection on a frame over its size. A message with
        // 16 KiB of headers then took every worker on its queue down, again
        // at each redelivery.
        let connect = async {
            match &self.tls {
                None => Connection::connect_uri(uri.clone(), props).await,
                Some(pem) => {
                    let runtime = lapin::runtime::default_runtime()?;
                    let tls = OwnedTLSConfig {
                        identity: None,
                        cert_chain: Some(pem.clone()),
                    };
                    Connection::connect_uri_with_config(uri.clone(), props, tls, runtime).await
                }
            }
        };
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| BrokerError::ConnectTimeout {
                url: url.clone(),
                secs: CONNECT_TIMEOUT.as_secs(),
            })?
            .map_err(|source| {
                if let Some(reason) = refusal(&source) {
                    return BrokerError::Refused {
                        url: url.clone(),
                        reason,
                    };
                }
                let hint = if source.to_string().contains("certificate") {
                    "; the broker's TLS certificate is not trusted: if it comes from a \
                     private CA, set BROKER_CA_FILE to that CA's PEM file"
                } else {
                    ""
                };
                BrokerError::Connect { url, source, hint }
            })?;

        let consume_channel = connection
            .create_channel()
            .await
            .map_err(setup("a channel"))?;
        let publish_channel = connection
            .create_channel()
            .await
            .map_err(setup("a channel"))?;
        publish_channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(setup("publisher confirms"))?;

        declare_exchanges(&consume_channel).await?;
        let control = if control {
            Some(self.open_control(&connection).await?)
        } else {
            None
        };
        for queue in queues {
            self.declare_queue(&consume_channel, queue).await?;
        }
        // Global QoS: RabbitMQ applies it to the whole channel and lets it
        // change while consuming (per-consumer QoS only affects new
        // consumers), which is what holding `eta` tasks needs.
        set_prefetch(&consume_channel, prefetch)
            .await
            .map_err(setup("prefetch settings"))?;
        let watch = if control.is_some() {
            Some(self.watch_channel(&consume_channel).await?)
        } else {
            None
        };
        let mut deliveries = SelectAll::new();
        for queue in queues.iter().filter(|_| consume) {
            deliveries.push(self.consume_queue(&consume_channel, &queue.name).await?);
        }
        Ok(Session {
            connection: Arc::new(connection),
            consume_channel,
            publish_channel,
            deliveries,
            watch,
            control,
        })
    }
}

/// One live connection with its channels.
pub struct Session {
    /// Shared with remote control, which opens channels of its own on it.
    pub connection: Arc<Connection>,
    pub consume_channel: Channel,
    pub publish_channel: Channel,
    /// Deliveries from every task queue, merged.
    pub deliveries: SelectAll<Consumer>,
    /// The worker's session: the consuming channel's watch (see
    /// [`Broker::watch_channel`]), so that its end is seen while no task
    /// queue is consumed.
    pub watch: Option<Consumer>,
    /// The pidbox consumer, until the worker takes it for remote control.
    pub control: Option<ControlChannel>,
}

impl Session {
    /// Closes the connection; unacked deliveries go back to their queues.
    /// A broker that does not answer the close within [`CONNECT_TIMEOUT`]
    /// (the one that left a prefetch change unanswered, say) is left: the
    /// connection is dropped with the session.
    pub async fn close(&self) {
        let close = self.connection.close(200, "worker shutting down".into());
        let _ = tokio::time::timeout(CONNECT_TIMEOUT, close).await;
    }
}
