//! What becomes of each delivery: dropped (undecodable, unregistered, or
//! too large with no task id in its headers), failed unread (too large,
//! its task run neither here nor elsewhere), held for a run already here, its final event sent again
//! (ended here), held while the farm is asked (a redelivery), revoked or
//! expired, refused (an `eta` too far ahead), published again at the tail
//! of its queue (an `eta` ahead while MAX_ETA_HELD are held), given back
//! to the broker at once (it would run now but no slot is free: it crossed
//! the cancel of a node that filled up, or the farm said to run it here
//! on a full node), or accepted (now, or at its `eta`); and how a message
//! is settled once its outcome is confirmed.
//!
//! Owns the decision and the message's hold; what a task does is
//! [`super::task`]'s and the runner's business.

use super::admission::{Admission, Known, MAX_ETA_AHEAD, admit};
use super::*;
use crate::broker::Outgoing;
use crate::celery::log_text;
use lapin::BasicProperties;

impl<R: Runner> Inner<R> {
    /// Looks at one delivery and decides what becomes of it. Never blocks:
    /// acks and task runs are spawned.
    pub(super) fn on_delivery(self: &Arc<Self>, delivery: Delivery, link: &SessionLink) {
        let Delivery {
            data,
            properties,
            acker,
            routing_key,
            exchange,
            redelivered,
            ..
        } = delivery;
        let delivery = DeliveryInfo {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            priority: *properties.priority(),
            redelivered,
        };
        if data.len() > self.config.worker.max_message_bytes {
            // Its body is never read nor kept. A v2 message names its task
            // in its headers: it goes through admission like any other
            // (held for a run here or elsewhere, its final event sent
            // again, or failed). A v1 message's id is in its body.
            let bytes = data.len();
            drop(data);
            let Some(request) = celery::headers_only(&properties) else {
                tracing::error!(
                    bytes,
                    limit = self.config.worker.max_message_bytes,
                    routing_key = %delivery.routing_key,
                    "dropping a task message larger than MAX_MESSAGE_BYTES; its task id is not in \
                     its headers (protocol v1, or none valid), so no event is sent"
                );
                metrics::global().task_ended("", Outcome::Rejected);
                self.spawn_ack(acker, None);
                return;
            };
            let raw = Raw {
                properties,
                body: Vec::new(),
                too_large: Some(bytes),
            };
            let span = tracing::info_span!("task", task_id = %request.id);
            self.place(Arc::new(request), raw, acker, delivery, Some(link), span);
            return;
        }
        // A flood of `eta` messages beyond MAX_ETA_HELD goes back to its
        // queue without its body being read: its headers say so (protocol
        // v2). Not one that is revoked or expired: that one is decided in
        // full, under the registry's lock, like any message that gets that
        // far.
        let now = chrono::Utc::now();
        let passes = |peek: &celery::Peek| {
            peek.eta > now
                && peek.eta - now <= MAX_ETA_AHEAD
                && peek.expires.is_none_or(|expires| expires > now)
                && self.registry.scheduled() >= self.config.worker.max_eta_held
                && !self.registry.is_revoked(&peek.id)
        };
        if celery::peek(&properties).is_some_and(|peek| passes(&peek)) {
            let raw = Raw {
                properties,
                body: data,
                too_large: None,
            };
            self.pass_back(raw, acker, delivery, tracing::Span::current());
            return;
        }
        let request = match celery::decode(&properties, &data) {
            Ok(r) => Arc::new(r),
            Err(error) => {
                tracing::error!(task_id = ?error.task_id, %error, "dropping an undecodable task message");
                metrics::global().task_ended("", Outcome::Rejected);
                let confirmed = error.task_id.as_ref().map(|id| {
                    self.events.emit_confirmed(&EventKind::TaskFailed {
                        uuid: id.clone(),
                        exception: ExceptionInfo {
                            exc_type: "DecodeError".to_owned(),
                            exc_module: "builtins".to_owned(),
                            message: error.to_string(),
                            traceback: String::new(),
                        }
                        .repr(),
                        traceback: String::new(),
                    })
                });
                self.spawn_ack(acker, confirmed);
                return;
            }
        };
        let raw = Raw {
            properties,
            body: data,
            too_large: None,
        };
        let span = tracing::info_span!("task", task_id = %request.id);
        self.place(request, raw, acker, delivery, Some(link), span);
    }

    /// Carries out what [`admit`] decides for a decoded task message: from
    /// what the registry, the record of ended tasks and the revoked ids
    /// say of it (read under the registry's lock, which an accepted task
    /// enters, its message held, before the lock goes), and whether the
    /// farm can be asked (`link`; none once the farm said to run it here).
    /// Returns what was decided.
    pub(super) fn place(
        self: &Arc<Self>,
        request: Arc<TaskRequest>,
        raw: Raw,
        acker: Acker,
        delivery: DeliveryInfo,
        link: Option<&SessionLink>,
        span: tracing::Span,
    ) -> Admission {
        let _enter = span.enter();
        let cancel = Cancellation::new();
        let mut acker = Some(acker);
        let admission = self.registry.admit(&request.id, |seen| {
            let known = Known {
                here: seen.here,
                ended: self.ended.get(&request.id),
                revoked: seen.revoked,
                can_ask_farm: link.is_some(),
                eta_room: seen.scheduled < self.config.worker.max_eta_held,
                too_large: raw.too_large.is_some(),
                slot_free: !self.prefetch.is_full(),
            };
            let admission = admit(&request, delivery.redelivered, known, chrono::Utc::now());
            let Admission::Accept { at_eta } = admission else {
                return (admission, None);
            };
            // Held before the registry's lock goes: a redelivery that
            // finds the task there finds its message held too.
            if let Some(acker) = acker.take() {
                self.prefetch.hold(&request.id, acker, !at_eta);
            }
            let entry = TaskEntry::new(request.clone(), at_eta, cancel.clone(), delivery.clone());
            (admission, Some(entry))
        });
        let Some(acker) = acker else {
            self.received(request, cancel, delivery, &span);
            return admission;
        };
        match &admission {
            Admission::Accept { .. } => unreachable!("accepted above, its message held"),
            Admission::TooLarge => {
                let bytes = raw.too_large.unwrap_or_default();
                self.too_large(request, acker, bytes, &span);
            }
            Admission::NoSlot => {
                tracing::debug!(
                    "every slot is busy: giving the message back to the broker for a node with a free slot"
                );
                self.spawn_settle(acker, None, Settle::Requeue);
            }
            Admission::Unregistered => {
                tracing::error!(task = %log_text(&request.name), "received an unregistered task; rejecting it");
                metrics::global().task_ended(&request.name, Outcome::Rejected);
                let info = ExceptionInfo {
                    exc_type: "NotRegistered".to_owned(),
                    exc_module: "celery.exceptions".to_owned(),
                    message: request.name.clone(),
                    traceback: String::new(),
                };
                let confirmed = self.refused(&request, info);
                self.spawn_settle(acker, Some(confirmed), Settle::Reject);
            }
            Admission::AlreadyHere(phase) => {
                tracing::info!(
                    phase = ?*phase,
                    "redelivered message for a task already here; acking it when that run ends"
                );
                match self.prefetch.hold_again(&request.id, acker) {
                    // Held without a slot: room for one more.
                    Ok(()) => {
                        let this = self.clone();
                        self.tasks
                            .spawn(async move { this.prefetch.settle().await });
                    }
                    Err(NotHeld(acker)) => self.spawn_ack(acker, None),
                }
            }
            Admission::EndedHere(event) => {
                // Sent again only when this process does not know that the
                // broker has it (it ended in an earlier life of the worker,
                // or its confirm never came): one final event per task.
                let confirmed = if self.ended.is_confirmed(&request.id) {
                    tracing::info!(
                        event = event.event_type(),
                        "redelivered message for a task that already ended here, its final event confirmed; acking it"
                    );
                    None
                } else {
                    tracing::info!(
                        event = event.event_type(),
                        "redelivered message for a task that already ended here; sending its final event again"
                    );
                    Some(self.events.emit_confirmed(event))
                };
                if releasable(event) {
                    // The worker may have died between the record and the
                    // release: release again (it is idempotent).
                    self.tasks
                        .spawn(self.runner.release(&request.id).instrument(span.clone()));
                }
                self.spawn_ack(acker, confirmed);
            }
            Admission::AskFarm => {
                // Not here, not ended here: the broker gave it back, maybe
                // while it runs on another node (past its consumer_timeout).
                // Held without a slot while the farm is asked.
                let link = link.expect("the farm is asked only with a session").clone();
                let session = self.prefetch.hold(&request.id, acker, false);
                tracing::info!(
                    "redelivered message for a task not run here; asking the farm whether a node runs it"
                );
                let this = self.clone();
                drop(_enter);
                self.tasks.spawn(
                    async move {
                        this.prefetch.settle().await;
                        this.resolve_redelivery(request, raw, delivery, session, link)
                            .await;
                    }
                    .instrument(span.clone()),
                );
            }
            Admission::Expired | Admission::Revoked => {
                self.not_run(request, acker, admission == Admission::Expired, &span);
            }
            Admission::EtaTooFar => {
                tracing::error!(
                    eta = ?request.eta,
                    max_days = MAX_ETA_AHEAD.num_days(),
                    "refusing a task whose eta is too far ahead"
                );
                metrics::global().task_ended(&request.name, Outcome::Rejected);
                let info = ExceptionInfo {
                    exc_type: "ValueError".to_owned(),
                    exc_module: "builtins".to_owned(),
                    message: format!(
                        "eta {} is more than {} days ahead: this worker does not hold a task \
                         that long",
                        request
                            .eta
                            .as_ref()
                            .map(celery::iso8601::format)
                            .unwrap_or_default(),
                        MAX_ETA_AHEAD.num_days()
                    ),
                    traceback: String::new(),
                };
                let confirmed = self.refused(&request, info);
                self.spawn_ack(acker, Some(confirmed));
            }
            Admission::Requeue => {
                tracing::debug!(eta = ?request.eta, "no room for one more eta task here");
                drop(_enter);
                self.pass_back(raw, acker, delivery, span.clone());
            }
        }
        admission
    }

    /// Publishes an `eta` message again, as it came, to the exchange and
    /// routing key it came through (the tail of its queue), and acks it
    /// once the broker confirmed the copy. Up to [`MAX_PASSING`] of them
    /// are held in the prefetch book meanwhile, holding no slot, so the
    /// broker sends the next message while they travel: a flood goes by at
    /// the pace of its copies, not of one broker round trip per message,
    /// and the tasks behind it come through.
    fn pass_back(
        self: &Arc<Self>,
        raw: Raw,
        acker: Acker,
        delivery: DeliveryInfo,
        span: tracing::Span,
    ) {
        let n = self.counters.eta_requeued.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(
                requeued = n,
                held = self.config.worker.max_eta_held,
                "MAX_ETA_HELD tasks are held for their eta: publishing those that come \
                 beyond it again at the tail of their queue"
            );
        }
        let (sent, confirmed) = tokio::sync::oneshot::channel();
        self.outbox.push(Outgoing {
            exchange: delivery.exchange,
            routing_key: delivery.routing_key,
            body: raw.body,
            properties: raw.properties,
            keep: true,
            confirmed: Some(sent),
        });
        let passing = &self.counters.passing;
        if passing.fetch_add(1, Ordering::SeqCst) >= MAX_PASSING {
            passing.fetch_sub(1, Ordering::SeqCst);
            // Acked only once the broker has the copy: until then the
            // message is the broker's to give back.
            self.spawn_ack(acker, Some(confirmed));
            return;
        }
        // Not a task id (those have no `:`): the book cannot mix them up.
        let key = format!(
            "passing:{}",
            self.counters.passed.fetch_add(1, Ordering::Relaxed)
        );
        self.prefetch.hold(&key, acker, false);
        let this = self.clone();
        self.tasks.spawn(
            async move {
                // Room for one more while this one travels.
                this.prefetch.settle().await;
                let _ = confirmed.await;
                // The prefetch lowered first, then the ack (see prefetch).
                this.prefetch.end(&key).await;
                this.counters.passing.fetch_sub(1, Ordering::SeqCst);
            }
            .instrument(span),
        );
    }

    /// Settles a redelivered message held by [`Inner::place`]: see
    /// [`crate::farm`].
    pub(super) async fn resolve_redelivery(
        self: Arc<Self>,
        request: Arc<TaskRequest>,
        raw: Raw,
        delivery: DeliveryInfo,
        session: u64,
        link: SessionLink,
    ) {
        let id = request.id.clone();
        let verdict = crate::farm::resolve(
            &link.connection,
            &self.farm,
            &id,
            self.config.worker.restart_grace,
            &link.over,
        )
        .await;
        match verdict {
            Verdict::EndedElsewhere { node } => {
                tracing::info!(node = %node, "the task ended on another node; acking its redelivered message without running it");
                metrics::global().redelivery(metrics::Redelivery::EndedElsewhere);
                self.prefetch.end(&id).await;
            }
            Verdict::RunHere { why } => match self.prefetch.take(&id, session) {
                Some(acker) => {
                    let placed = self.place(
                        request,
                        raw,
                        acker,
                        delivery,
                        None,
                        tracing::Span::current(),
                    );
                    if placed == Admission::NoSlot {
                        tracing::info!(
                            %why,
                            "the redelivered task may run, but not here: every slot is busy; the broker has it again"
                        );
                        metrics::global().redelivery(metrics::Redelivery::Returned);
                    } else {
                        tracing::info!(%why, "running the redelivered task here");
                        metrics::global().redelivery(metrics::Redelivery::RanHere);
                    }
                    // It was held without a slot, now with one, or gone.
                    self.prefetch.settle().await;
                }
                None => {
                    metrics::global().redelivery(metrics::Redelivery::Returned);
                    self.prefetch.forget_session(&id, session);
                }
            },
            Verdict::Returned => {
                tracing::info!(
                    "this node's session ended while it held the redelivered message; the broker has it again"
                );
                metrics::global().redelivery(metrics::Redelivery::Returned);
                self.prefetch.forget_session(&id, session);
            }
        }
    }

    /// A task that is not run: expired, or revoked before it arrived. Its
    /// end is recorded and reported, then its message acked.
    fn not_run(
        self: &Arc<Self>,
        request: Arc<TaskRequest>,
        acker: Acker,
        expired: bool,
        span: &tracing::Span,
    ) {
        if expired {
            tracing::warn!(expires = ?request.expires, "task expired before it could start; not running it");
        } else {
            tracing::warn!("task was revoked before it arrived; not running it");
        }
        let event = EventKind::TaskRevoked {
            uuid: request.id.clone(),
            terminated: false,
            signum: None,
            expired,
        };
        // Visible to the next delivery at once; on disk before the event
        // leaves, like every outcome (see `finish`).
        let recorded = self.ended.record(&request.id, &event);
        self.counters.processed.fetch_add(1, Ordering::Relaxed);
        metrics::global().task_ended(&request.name, Outcome::Revoked);
        let this = self.clone();
        self.tasks.spawn(
            async move {
                if let Err(error) = recorded.await {
                    record_failed(&error);
                }
                let confirmed = this.events.emit_final(
                    &event,
                    request.reply_to.as_deref(),
                    &request.id,
                    &TaskState::Revoked {
                        reason: if expired { "expired" } else { "revoked" }.to_owned(),
                    },
                );
                settle(acker, Some(confirmed), Settle::Ack).await;
            }
            .instrument(span.clone()),
        );
    }

    /// A task whose message is larger than MAX_MESSAGE_BYTES, run neither
    /// here nor elsewhere: failed (`task-failed`, a `ValueError` naming the
    /// size and the limit) without its body read. Recorded as ended like
    /// every outcome, so that a redelivery (its ack lost) finds its final
    /// event here; then acked.
    fn too_large(
        self: &Arc<Self>,
        request: Arc<TaskRequest>,
        acker: Acker,
        bytes: usize,
        span: &tracing::Span,
    ) {
        let limit = self.config.worker.max_message_bytes;
        tracing::error!(
            bytes,
            limit,
            task = %log_text(&request.name),
            "failing a task whose message is larger than MAX_MESSAGE_BYTES"
        );
        metrics::global().task_ended(&request.name, Outcome::Rejected);
        let info = ExceptionInfo {
            exc_type: "ValueError".to_owned(),
            exc_module: "builtins".to_owned(),
            message: format!(
                "the task message is {bytes} bytes, more than MAX_MESSAGE_BYTES ({limit}): \
                 this worker does not read it"
            ),
            traceback: String::new(),
        };
        let event = EventKind::TaskFailed {
            uuid: request.id.clone(),
            exception: info.repr(),
            traceback: String::new(),
        };
        // Visible to the next delivery at once; on disk before the event
        // leaves, like every outcome (see `finish`).
        let recorded = self.ended.record(&request.id, &event);
        let this = self.clone();
        self.tasks.spawn(
            async move {
                if let Err(error) = recorded.await {
                    record_failed(&error);
                }
                let confirmed = this.refused(&request, info);
                settle(acker, Some(confirmed), Settle::Ack).await;
            }
            .instrument(span.clone()),
        );
    }

    /// Starts the life of a task just accepted (in the registry, its
    /// message held): held until its `eta`, or started.
    fn received(
        self: &Arc<Self>,
        request: Arc<TaskRequest>,
        cancel: Cancellation,
        delivery: DeliveryInfo,
        span: &tracing::Span,
    ) {
        self.events.emit(&EventKind::TaskReceived {
            uuid: request.id.clone(),
            name: request.name.clone(),
            args: request.argsrepr.clone(),
            kwargs: request.kwargsrepr.clone(),
            root_id: request.root_id.clone(),
            parent_id: request.parent_id.clone(),
            retries: request.retries,
            eta: request.eta.as_ref().map(celery::iso8601::format),
            expires: request.expires.as_ref().map(celery::iso8601::format),
        });
        tracing::info!(task = %log_text(&request.name), "task received");
        self.tasks.spawn(
            self.clone()
                .task_life(request, cancel, delivery)
                .instrument(span.clone()),
        );
    }

    /// Acks once `confirmed` resolves (the final event reached the broker).
    /// The final `task-failed` (and rpc result) of a task refused before
    /// it ran; settled once the broker has it.
    fn refused(&self, request: &TaskRequest, info: ExceptionInfo) -> crate::events::Confirmed {
        self.events.emit_final(
            &EventKind::TaskFailed {
                uuid: request.id.clone(),
                exception: info.repr(),
                traceback: String::new(),
            },
            request.reply_to.as_deref(),
            &request.id,
            &TaskState::Failure(info),
        )
    }

    pub(super) fn spawn_ack(&self, acker: Acker, confirmed: Option<crate::events::Confirmed>) {
        self.spawn_settle(acker, confirmed, Settle::Ack);
    }

    /// Settles a message once `confirmed` resolves, in a task of its own.
    pub(super) fn spawn_settle(
        &self,
        acker: Acker,
        confirmed: Option<crate::events::Confirmed>,
        how: Settle,
    ) {
        self.tasks.spawn(settle(acker, confirmed, how));
    }
}

/// Most `eta` messages on their way back to their queue held in the
/// prefetch book at once (each holds its bytes until the broker has the
/// copy); more wait for a slot's room instead.
const MAX_PASSING: usize = 64;

/// A task message as it came: what publishing it again takes. Dropped
/// once the message is placed, unless it goes back to its queue.
pub(super) struct Raw {
    pub properties: BasicProperties,
    pub body: Vec<u8>,
    /// The size of a body larger than MAX_MESSAGE_BYTES, which is not kept
    /// (`body` is then empty): such a message is never run nor published
    /// again.
    pub too_large: Option<usize>,
}

/// What becomes of a task message whose outcome is reported.
#[derive(Debug, Clone, Copy)]
pub(super) enum Settle {
    /// Done with: acked.
    Ack,
    /// Never to run anywhere (an unregistered task): rejected, not requeued.
    Reject,
    /// Not for this node now (no free slot): rejected and requeued, for
    /// another node (the broker marks it redelivered).
    Requeue,
}

/// Like every final outcome: the report is confirmed by the broker first
/// (`confirmed`, when there is one), then the message goes. If the
/// connection drops in between, the redelivery finds the task in `ended`
/// and sends its final event again.
pub(super) async fn settle(acker: Acker, confirmed: Option<crate::events::Confirmed>, how: Settle) {
    if let Some(confirmed) = confirmed {
        let _ = confirmed.await;
    }
    match how {
        Settle::Ack => ack(&acker).await,
        Settle::Reject | Settle::Requeue => {
            let requeue = matches!(how, Settle::Requeue);
            if let Err(error) = acker.reject(BasicRejectOptions { requeue }).await {
                tracing::debug!(%error, "reject failed; the broker will redeliver");
            }
        }
    }
}
