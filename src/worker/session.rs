//! The broker session loop: connect (with backoff), go live (the consumers
//! wanted now, remote control beside), consume until the connection is
//! lost or shutdown, reconnect.
//!
//! Owns the session's life only: what a delivery becomes is
//! [`super::delivery`]'s business, remote control [`crate::control`]'s,
//! and the farm watcher it starts per session [`crate::farm`]'s.

use super::topology::Drift;
use super::*;
use crate::celery::log_text;

impl<R: Runner> Inner<R> {
    /// Connects (with backoff), consumes, and reconnects on loss until
    /// `shutdown` fires. Returns the live session, if any, for the goodbye;
    /// [`WorkerError::NodeInUse`] when another worker holds this node's
    /// name. The tasks `adoption` adopted start once the first connect
    /// made the node's name ours.
    pub(super) async fn session_loop(
        self: &Arc<Self>,
        channels: &watch::Sender<Option<lapin::Channel>>,
        shutdown: &CancellationToken,
        adoption: Adoption,
    ) -> Result<Option<Session>, WorkerError> {
        let mut adoption = Some(adoption);
        let mut retry = Retry::broker();
        let mut first = true;
        let mut locked_since: Option<Instant> = None;
        loop {
            let prefetch = self.prefetch.next_session().await;
            let queues = self.topology.queues();
            let session = tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                s = self.broker.connect_with(prefetch, &queues) => s,
            };
            let mut session = match session {
                Ok(s) => s,
                Err(BrokerError::NodeInUse { node }) => {
                    // At start: another worker has this name. After a
                    // connection loss: maybe our own old connection, which
                    // the broker has not dropped yet; wait for it a while.
                    let since = *locked_since.get_or_insert_with(Instant::now);
                    if first || since.elapsed() >= NODE_LOCK_PATIENCE {
                        return Err(WorkerError::NodeInUse { node });
                    }
                    let delay = retry.delay();
                    tracing::warn!(
                        node = %node,
                        retry_in = ?delay,
                        "this node's remote-control queue is still locked, probably by this \
                         worker's previous connection; retrying"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
                // At start a refused login is configuration to fix; later
                // it may be the broker's auth backend having a bad moment.
                Err(error) if first && error.is_refusal() => return Err(error.into()),
                Err(error) => {
                    let delay = retry.delay();
                    tracing::error!(%error, retry_in = ?delay, "broker unreachable");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            retry.reset();
            locked_since = None;
            if let Some(adoption) = adoption.take() {
                // The node's name is ours now: what an earlier run of it
                // left can go, but the tasks kept, before any task of this
                // run starts; then the adopted ones carry on.
                self.runner.claim_node(&adoption.keep()).await;
                self.carry_on(adoption);
            }
            // Before any delivery of this session is read: they are held on
            // this channel.
            self.prefetch
                .attach(session.consume_channel.clone(), prefetch)
                .await;
            let (consumers_tx, mut consumers) = mpsc::unbounded_channel();
            self.go_live(&mut session, &queues, consumers_tx).await;
            let _ = channels.send(Some(session.publish_channel.clone()));
            tracing::info!(
                broker = %self.broker.display_url(),
                queues = ?self.topology.queues().iter().map(|q| q.name.as_str()).collect::<Vec<_>>(),
                concurrency = self.config.worker.concurrency,
                startup_ms = if first { self.started_at.elapsed().as_millis() } else { 0 },
                "connected to the broker; consuming"
            );
            metrics::global().broker_up(!first);
            first = false;
            let online = self
                .events
                .emit_confirmed(&EventKind::WorkerOnline(self.stats()));
            self.tasks.spawn(heartbeat_confirmed(online));

            let session_over = CancellationToken::new();
            let control = session.control.take().map(|control| {
                tokio::spawn(crate::control::serve(
                    Worker {
                        inner: self.clone(),
                    },
                    ControlSession {
                        broker: self.broker.clone(),
                        connection: session.connection.clone(),
                        control,
                    },
                    session_over.clone(),
                ))
            });
            // Who runs what, heard on this session.
            self.tasks.spawn(
                self.farm
                    .clone()
                    .watch(session.connection.clone(), session_over.clone()),
            );
            let link = SessionLink {
                connection: session.connection.clone(),
                over: session_over.clone(),
            };
            let session_guard = session_over.clone().drop_guard();
            let shut = loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break true,
                    Some(consumer) = consumers.recv() => session.deliveries.push(consumer),
                    delivery = session.deliveries.next(), if !session.deliveries.is_empty() => {
                        match delivery {
                            Some(Ok(delivery)) => self.on_delivery(delivery, &link),
                            Some(Err(error)) => {
                                if let Some(reason) = crate::broker::delivery_timeout(&error) {
                                    metrics::global().delivery_timeout();
                                    tracing::error!(
                                        %reason,
                                        "the broker closed the task channel: a task's message stayed unacked past \
                                         its consumer_timeout (30 min by default) and was requeued, for this or \
                                         another node; tasks here keep running. The broker's operator should \
                                         raise it above the longest task: consumer_timeout in rabbitmq.conf \
                                         (e.g. consumer_timeout = 1209600000 for 14 days) or advanced.config, or \
                                         on RabbitMQ 3.12+ a consumer-timeout policy on the task queues; \
                                         reconnecting"
                                    );
                                } else {
                                    tracing::warn!(%error, "lost the broker connection; reconnecting");
                                }
                                break false;
                            }
                            // Every consumer was cancelled on purpose
                            // (`cancel_consumer`): consume nothing until
                            // `add_consumer`.
                            None if self.topology.is_empty() => {
                                tracing::warn!("consuming no queue now (every queue was cancelled by remote control)");
                            }
                            None => {
                                tracing::warn!("the broker closed the consumer; reconnecting");
                                break false;
                            }
                        }
                    }
                }
            };
            // The session is over: remote control stops with it.
            metrics::global().broker_down();
            self.topology.go_offline();
            drop(session_guard);
            if let Some(control) = control {
                let _ = control.await;
            }
            if shut {
                return Ok(Some(session));
            }
            let _ = channels.send(None);
            session.close().await;
            let delay = retry.delay();
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Makes a new session the one remote control acts on, and brings its
    /// consumers in line with the queues wanted now: `add_consumer` and
    /// `cancel_consumer` may have run between the connect (which consumed
    /// `consumed`) and this moment.
    pub(super) async fn go_live(
        &self,
        session: &mut Session,
        consumed: &[TaskQueue],
        consumers: mpsc::UnboundedSender<Consumer>,
    ) {
        let live = LiveSession {
            connection: session.connection.clone(),
            consume_channel: session.consume_channel.clone(),
            consumers,
        };
        let Drift { missing, extra } = self.topology.go_live(live, consumed);
        for queue in missing {
            let consumer = async {
                self.broker
                    .declare_queue_apart(&session.connection, &queue)
                    .await?;
                self.broker
                    .consume_queue(&session.consume_channel, &queue.name)
                    .await
            };
            match consumer.await {
                Ok(consumer) => session.deliveries.push(consumer),
                Err(error) => {
                    tracing::warn!(queue = %log_text(&queue.name), %error, "cannot consume a queue")
                }
            }
        }
        for queue in extra {
            if let Err(error) = self
                .broker
                .cancel_queue(&session.consume_channel, &queue.name)
                .await
            {
                tracing::warn!(queue = %log_text(&queue.name), %error, "cannot stop consuming a queue");
            }
        }
    }
}
