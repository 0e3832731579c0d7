//! The broker session loop: connect (with backoff), go live (the consumers
//! wanted now, remote control beside), consume until the connection is
//! lost or shutdown, reconnect; and, beside each session, the pacer that
//! cancels the task consumers while every slot is busy and consumes again
//! when one frees (a full node takes nothing: see [`crate::prefetch`]). A
//! session that starts full starts without consumers.
//!
//! When a session ends, the tasks it brought that have not started (waiting
//! for a slot, or for their `eta`) are dropped: their messages went back
//! to the broker with it, for whichever node gets them next.
//!
//! Owns the session's life and its consumers' pausing only: what a
//! delivery becomes is [`super::delivery`]'s business, remote control
//! [`crate::control`]'s, and the farm watcher it starts per session
//! [`crate::farm`]'s.

use futures_util::stream::{BoxStream, SelectAll};

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
            // A node whose every slot is busy takes nothing: it consumes
            // once one frees (the pacer).
            let consume = !self.prefetch.is_full();
            let session = tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                s = self.broker.connect_with(prefetch, &queues, consume) => s,
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
            let broken = CancellationToken::new();
            self.prefetch
                .attach(session.consume_channel.clone(), prefetch, broken.clone())
                .await;
            let (consumers_tx, mut consumers) = mpsc::unbounded_channel();
            let mut reads = self
                .go_live(&mut session, &queues, consume, consumers_tx)
                .await;
            let _ = channels.send(Some(session.publish_channel.clone()));
            tracing::info!(
                broker = %self.broker.display_url(),
                queues = ?self.topology.queues().iter().map(|q| q.name.as_str()).collect::<Vec<_>>(),
                concurrency = self.config.worker.concurrency,
                startup_ms = if first { self.started_at.elapsed().as_millis() } else { 0 },
                "connected to the broker; consuming"
            );
            if !consume {
                tracing::info!(
                    "every slot is busy: taking no task until one frees (the queues are consumed again then)"
                );
            }
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
            let pacer = tokio::spawn(self.clone().pace(session_over.clone()));
            let shut = loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break true,
                    _ = broken.cancelled() => {
                        tracing::warn!("the task channel cannot take a prefetch change; reconnecting");
                        break false;
                    }
                    Some((consumer, made_in)) = consumers.recv() => reads.push(task_reads(consumer, made_in)),
                    read = reads.next(), if !reads.is_empty() => {
                        match read {
                            Some(Read::Delivery(read)) => match *read {
                                Ok(delivery) => self.on_delivery(delivery, &link),
                                Err(error) => {
                                    channel_lost(&error);
                                    break false;
                                }
                            },
                            // Cancelled on purpose: a pause (every slot
                            // busy), or `cancel_consumer`.
                            Some(Read::TaskEnded(made_in)) if made_in < self.topology.generation() => {
                                if self.topology.is_empty() {
                                    tracing::warn!("consuming no queue now (every queue was cancelled by remote control)");
                                }
                            }
                            Some(Read::TaskEnded(_)) | Some(Read::WatchEnded) | None => {
                                tracing::warn!("the broker closed the consumer; reconnecting");
                                break false;
                            }
                        }
                    }
                }
            };
            // The session is over: remote control and the pacer stop with
            // it.
            metrics::global().broker_down();
            self.topology.go_offline();
            drop(session_guard);
            if let Some(control) = control {
                let _ = control.await;
            }
            // It may wait on a broker that no longer answers.
            pacer.abort();
            let _ = pacer.await;
            if shut {
                return Ok(Some(session));
            }
            // What it brought and did not start went back with it: dropped
            // now, before a slot frees for one of them, and again after the
            // close, which a held redelivery the farm said to run here may
            // have raced (once closed, its message cannot be taken back).
            let mut dropped = self.drop_unstarted();
            let _ = channels.send(None);
            session.close().await;
            dropped.extend(self.drop_unstarted());
            if !dropped.is_empty() {
                tracing::info!(
                    tasks = ?dropped,
                    "dropping the tasks not started yet: their messages went back to the broker with the lost session"
                );
            }
            let delay = retry.delay();
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Makes a new session the one remote control acts on, and brings its
    /// consumers in line with the queues wanted now: `add_consumer` and
    /// `cancel_consumer` may have run between the connect (which declared
    /// `declared`, and consumed them if `consuming`) and this moment. A
    /// paused session only declares the queues added meanwhile. Returns
    /// what the session loop reads: the session's consumers, its channel's
    /// watch among them.
    pub(super) async fn go_live(
        &self,
        session: &mut Session,
        declared: &[TaskQueue],
        consuming: bool,
        consumers: mpsc::UnboundedSender<(Consumer, u64)>,
    ) -> Reads {
        let live = LiveSession {
            connection: session.connection.clone(),
            consume_channel: session.consume_channel.clone(),
            consumers,
            consuming,
        };
        let Drift {
            missing,
            extra,
            made_in,
        } = self.topology.go_live(live, declared);
        let mut reads = Reads::new();
        for consumer in std::mem::take(&mut session.deliveries) {
            reads.push(task_reads(consumer, made_in));
        }
        if let Some(watch) = session.watch.take() {
            let ended = futures_util::stream::once(async { Read::WatchEnded });
            reads.push(watch.map(read_delivery).chain(ended).boxed());
        }
        let now = self.topology.generation();
        for queue in missing {
            let consumer = async {
                self.broker
                    .declare_queue_apart(&session.connection, &queue)
                    .await?;
                if !consuming {
                    return Ok(None);
                }
                self.broker
                    .consume_queue(&session.consume_channel, &queue.name)
                    .await
                    .map(Some)
            };
            match consumer.await {
                Ok(Some(consumer)) => reads.push(task_reads(consumer, now)),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(queue = %log_text(&queue.name), %error, "cannot consume a queue")
                }
            }
        }
        for queue in extra.iter().filter(|_| consuming) {
            if let Err(error) = self
                .broker
                .cancel_queue(&session.consume_channel, &queue.name)
                .await
            {
                tracing::warn!(queue = %log_text(&queue.name), %error, "cannot stop consuming a queue");
            }
        }
        reads
    }

    /// Drops the tasks not started (see the module doc); their ids.
    fn drop_unstarted(&self) -> Vec<String> {
        self.registry.drop_unstarted(|id| self.prefetch.forget(id))
    }

    /// Beside a session until `over`: cancels the task consumers while
    /// every slot is busy and consumes the queues wanted again when one
    /// frees, as [`Prefetch::full`](crate::prefetch::Prefetch::full) says.
    pub(super) async fn pace(self: Arc<Self>, over: CancellationToken) {
        let mut full = self.prefetch.full();
        loop {
            let now = *full.borrow_and_update();
            self.consume_while_free(now).await;
            tokio::select! {
                _ = over.cancelled() => return,
                changed = full.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Pauses the live session when `full`, else resumes it, if it is not
    /// so already; in the topology's turn, so that remote control's
    /// `add_consumer` and `cancel_consumer` apply before or after, whole.
    async fn consume_while_free(&self, full: bool) {
        let _turn = self.topology.turn().await;
        if full {
            let Some((live, names)) = self.topology.pause() else {
                return;
            };
            tracing::debug!("every slot is busy: not consuming until one frees");
            for name in names {
                if let Err(error) = self.broker.cancel_queue(&live.consume_channel, &name).await {
                    tracing::debug!(queue = %log_text(&name), %error, "cannot stop consuming a queue");
                }
            }
        } else {
            let Some((live, names)) = self.topology.to_resume() else {
                return;
            };
            tracing::debug!("a slot is free: consuming again");
            let made_in = self.topology.generation();
            for name in names {
                match self
                    .broker
                    .consume_queue(&live.consume_channel, &name)
                    .await
                {
                    // A session that ended meanwhile took its consumers
                    // along; the next one consumes every listed queue.
                    Ok(consumer) => {
                        let _ = live.consumers.send((consumer, made_in));
                    }
                    Err(error) => {
                        tracing::warn!(queue = %log_text(&name), %error, "cannot consume a queue")
                    }
                }
            }
            self.topology.resumed();
        }
    }
}

/// What the session loop reads from its consumers.
pub(super) enum Read {
    /// A delivery, or the error that ended a consumer's stream (the
    /// channel or the connection lost).
    Delivery(Box<Result<Delivery, lapin::Error>>),
    /// A task consumer's stream ended without an error; it was made in
    /// that [`Topology`] generation.
    TaskEnded(u64),
    /// The channel's watch ended without an error: the broker cancelled it.
    WatchEnded,
}

/// Every consumer of a session, merged.
pub(super) type Reads = SelectAll<BoxStream<'static, Read>>;

/// A task consumer's deliveries, then its end, made in `made_in`.
fn task_reads(consumer: Consumer, made_in: u64) -> BoxStream<'static, Read> {
    let ended = futures_util::stream::once(async move { Read::TaskEnded(made_in) });
    consumer.map(read_delivery).chain(ended).boxed()
}

fn read_delivery(delivery: Result<Delivery, lapin::Error>) -> Read {
    Read::Delivery(Box::new(delivery))
}

/// Says why the task channel's consumers ended with `error`: the broker's
/// delivery timeout (named, counted), or the connection lost.
fn channel_lost(error: &lapin::Error) {
    if let Some(reason) = crate::broker::delivery_timeout(error) {
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
}
