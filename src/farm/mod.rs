//! What the rest of the farm does with a task, so that a task runs once in
//! the farm however often the broker redelivers it and whatever a node
//! goes through (a freeze, a stall, a cut link, a broker alarm, a restart).
//!
//! RabbitMQ requeues a message whose delivery stayed unacked past its
//! `consumer_timeout` (30 min by default) while the node that got it keeps
//! running the task; any idle node may then receive it. The receiver (the
//! *holder*) holds it without starting it and asks the farm, with Celery's
//! own `query_task` broadcast, whether a live node has that id. Every node
//! also lists, in its `worker-heartbeat` and `worker-online` (an extra
//! field `task_ids`, which Celery and Flower ignore), the ids it runs or
//! keeps: the [`FarmView`] remembers who runs what, and how long each node
//! has been silent *while this node heard the farm* (see [`silence`]).
//!
//! The hold rules ([`Hold`]):
//!
//! - a node ended it (`ready`, or its final event passes): ack here, the
//!   task is not run again;
//! - a node answers that it holds it (`active`, `reserved`, `scheduled`):
//!   watch that node;
//! - nobody answers, but a node's last list has the id: the task was last
//!   seen there; watch that node (it may be frozen, cut off or restarting);
//! - nobody, and no node was seen running it: asked again for
//!   [`CLAIM_GRACE`] (a node reconnecting is heard), then run here.
//!
//! Watching node N (asked again every [`POLL_EVERY`]): the task's final
//! event → ack; N answers that it no longer has it (after a second for a
//! final event on its way) → run here at once (N is back without it, e.g.
//! its host rebooted); N's `worker-offline` without keeping it → a last
//! look, then run here; N silent for RESTART_GRACE while this node heard
//! the farm → run here. A `worker-offline` whose `kept` lists the task
//! (a restart) is a sign of life: N's silence counts from it.
//!
//! An error is never a verdict: a probe that fails is opened again after
//! 2 s, the hold going on where it was ([`resolve`]); only the rules above
//! run a task here. When the holder's session ends, the held message is
//! back with the broker and the hold is given up ([`Verdict::Returned`]).
//!
//! The running node's side ([`taken_over`]): a node that did not hear
//! itself for RESTART_GRACE less a quarter of it (a *deaf episode*, since
//! the task started here, see [`silence`]) asks the farm before it uploads
//! or sends the task's final event; if another node holds or ended it, it
//! drops the task. The margins: a holder counts N's silence only while it
//! hears its own heartbeats, so N, whose heartbeats did not reach the
//! broker all that time, was deaf for at least as long, less two heartbeat
//! intervals; a quarter of RESTART_GRACE covers that and the 3 s a
//! heartbeat may take to be fresh. The previous issue's rule (a node away
//! longer than RESTART_GRACE does not adopt its kept tasks) completes it.
//!
//! Owns the probe (one channel per held message on the session's
//! connection, with a reply queue for `query_task` and an exclusive queue
//! of the farm's final task events and goodbyes), the view and its
//! watcher. It must not ack, run or decide anything about the held message
//! itself: the worker does, from the [`Verdict`].

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, Consumer, ExchangeKind};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::{CONTROL_EXCHANGE, EVENT_EXCHANGE};

pub mod silence;
mod view;

pub use view::FarmView;

/// kombu's reply exchange for remote control (direct, transient).
const REPLY_EXCHANGE: &str = "reply.celery.pidbox";
/// How long replies to one `query_task` are collected (Celery's `inspect`
/// waits 1 s; a loaded node gets twice that).
pub const QUERY_WINDOW: Duration = Duration::from_secs(2);
/// How long a redelivered task nobody claims is asked about before it runs
/// here: long enough for a node that lost its connection for a moment to
/// be back and answer.
pub const CLAIM_GRACE: Duration = Duration::from_secs(10);
/// Between two direct questions to the node running a held task.
pub const POLL_EVERY: Duration = Duration::from_secs(5);
/// Between two probes after one failed, and between two one-shot
/// questions that failed.
pub const RETRY_EVERY: Duration = Duration::from_secs(2);

/// The routing keys of `celeryev` the probe listens to (heartbeats are the
/// view's).
const WATCHED_EVENTS: [&str; 4] = [
    "task.succeeded",
    "task.failed",
    "task.revoked",
    "worker.offline",
];

/// What became of a held redelivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No node has the task, its node let it go unfinished or answers
    /// without it, or was silent for RESTART_GRACE while this node heard
    /// the farm: run it here.
    RunHere { why: String },
    /// The task ended on `node`: ack the message, do not run it.
    EndedElsewhere { node: String },
    /// This node's session ended while holding: the message went back to
    /// the broker; let it go.
    Returned,
}

/// The probe could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot ask the farm about a redelivered task ({what}): {source}")]
    Broker {
        what: &'static str,
        source: lapin::Error,
    },
    #[error("cannot ask the farm about a redelivered task: the broker ended its {what} consumer")]
    ConsumerEnded { what: &'static str },
}

impl ProbeError {
    /// What failed, to say each kind once.
    fn what(&self) -> &'static str {
        match self {
            Self::Broker { what, .. } | Self::ConsumerEnded { what } => what,
        }
    }
}

fn probe_error(what: &'static str) -> impl FnOnce(lapin::Error) -> ProbeError {
    move |source| ProbeError::Broker { what, source }
}

/// A node's answer about the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Whereabouts {
    /// `active`, `reserved` or `scheduled` there.
    Held { state: String },
    /// `ready`: it ended there (or is ending: its final event is out).
    Ended,
    /// The node answered without the task.
    Absent,
}

/// What the farm said to one `query_task`, by node.
pub type Answers = BTreeMap<String, Whereabouts>;

/// What a round of answers means for the holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Ended { node: String },
    Held { node: String },
    Nobody,
}

/// Reads a round of answers (this node's own left out): an end anywhere
/// wins, then a node holding it.
pub fn claim(answers: &Answers, me: &str) -> Claim {
    let others = || answers.iter().filter(|(node, _)| node.as_str() != me);
    if let Some((node, _)) = others().find(|(_, w)| **w == Whereabouts::Ended) {
        return Claim::Ended { node: node.clone() };
    }
    if let Some((node, _)) = others().find(|(_, w)| matches!(w, Whereabouts::Held { .. })) {
        return Claim::Held { node: node.clone() };
    }
    Claim::Nobody
}

/// One node's `query_task` reply body, `{"<node>": {id: [state, info]}}`,
/// read for task `id`. `None` when it is not a reply.
pub fn read_answer(body: &[u8], id: &str) -> Option<(String, Whereabouts)> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let (node, reply) = value.as_object()?.iter().next()?;
    let whereabouts = match reply.get(id).and_then(|v| v.get(0)).and_then(Value::as_str) {
        None => Whereabouts::Absent,
        Some("ready") => Whereabouts::Ended,
        Some(state) => Whereabouts::Held {
            state: state.to_owned(),
        },
    };
    Some((node.clone(), whereabouts))
}

/// The parts of a `celeryev` event the probe reads.
#[derive(Debug, Deserialize)]
struct Seen {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    uuid: Option<String>,
    /// `worker-offline`: the tasks the node left running for its next
    /// start.
    #[serde(default)]
    kept: Vec<String>,
}

/// What one event says about the held task and its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sign {
    /// The task's final event, sent by `node`.
    Ended {
        node: String,
    },
    /// `node` said goodbye, letting the held task go.
    Offline {
        node: String,
    },
    /// `node` said goodbye but keeps the held task running for its next
    /// start.
    Leaving {
        node: String,
    },
    Other,
}

/// Reads one event body for task `id`.
pub fn read_event(body: &[u8], id: &str) -> Sign {
    let Ok(seen) = serde_json::from_slice::<Seen>(body) else {
        return Sign::Other;
    };
    match seen.kind.as_str() {
        "task-succeeded" | "task-failed" | "task-revoked" if seen.uuid.as_deref() == Some(id) => {
            Sign::Ended {
                node: seen.hostname,
            }
        }
        "worker-offline" if seen.kept.iter().any(|k| k == id) => Sign::Leaving {
            node: seen.hostname,
        },
        "worker-offline" => Sign::Offline {
            node: seen.hostname,
        },
        _ => Sign::Other,
    }
}

/// One held message's view of the farm.
pub struct Probe {
    channel: Channel,
    events: Consumer,
    replies: Consumer,
    /// Our reply routing key (kombu's mailbox `oid`).
    oid: String,
}

impl Probe {
    /// Opens the probe on `connection`: the event queue is
    /// bound before any question is asked, so no final event sent after
    /// the first answer can pass unseen.
    pub async fn open(connection: &Connection) -> Result<Self, ProbeError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(probe_error("opening a channel"))?;
        let private = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        // Named as Celery's own event receivers name theirs, so a broker
        // whose permissions allow those allows this one.
        let events_queue = format!("celeryev.{}", uuid::Uuid::new_v4());
        channel
            .queue_declare(events_queue.as_str().into(), private, FieldTable::default())
            .await
            .map_err(probe_error("declaring its event queue"))?;
        for key in WATCHED_EVENTS {
            channel
                .queue_bind(
                    events_queue.as_str().into(),
                    EVENT_EXCHANGE.into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(probe_error("binding its event queue to celeryev"))?;
        }
        channel
            .exchange_declare(
                REPLY_EXCHANGE.into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(probe_error("declaring reply.celery.pidbox"))?;
        let oid = uuid::Uuid::new_v4().to_string();
        let reply_queue = format!("{oid}.{REPLY_EXCHANGE}");
        channel
            .queue_declare(reply_queue.as_str().into(), private, FieldTable::default())
            .await
            .map_err(probe_error("declaring its reply queue"))?;
        channel
            .queue_bind(
                reply_queue.as_str().into(),
                REPLY_EXCHANGE.into(),
                oid.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(probe_error("binding its reply queue"))?;
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let events = channel
            .basic_consume(
                events_queue.as_str().into(),
                "".into(),
                no_ack,
                FieldTable::default(),
            )
            .await
            .map_err(probe_error("consuming its event queue"))?;
        let replies = channel
            .basic_consume(
                reply_queue.as_str().into(),
                "".into(),
                no_ack,
                FieldTable::default(),
            )
            .await
            .map_err(probe_error("consuming its reply queue"))?;
        Ok(Self {
            channel,
            events,
            replies,
            oid,
        })
    }

    /// Asks `query_task` about `id` of every node, or of `node` only, and
    /// collects answers for [`QUERY_WINDOW`] (or until `node` answered).
    /// Events that arrive meanwhile go to `signs`.
    pub async fn ask(
        &mut self,
        id: &str,
        node: Option<&str>,
        signs: &mut Vec<Sign>,
    ) -> Result<Answers, ProbeError> {
        let ticket = uuid::Uuid::new_v4().to_string();
        let body = json!({
            "method": "query_task",
            "arguments": {"ids": [id]},
            "destination": node.map(|n| vec![n]),
            "pattern": null,
            "matcher": null,
            "ticket": ticket,
            "reply_to": {"exchange": REPLY_EXCHANGE, "routing_key": self.oid},
        });
        let expires = crate::celery::now_timestamp() + QUERY_WINDOW.as_secs_f64();
        let mut headers = FieldTable::default();
        headers.insert("expires".into(), AMQPValue::Double(expires));
        self.channel
            .basic_publish(
                CONTROL_EXCHANGE.into(),
                "".into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_content_encoding("utf-8".into())
                    .with_headers(headers),
            )
            .await
            .map_err(probe_error("asking the farm"))?;
        let mut answers = Answers::new();
        let deadline = Instant::now() + QUERY_WINDOW;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Ok(answers),
                reply = self.replies.next() => {
                    let reply = match reply {
                        Some(Ok(reply)) => reply,
                        Some(Err(source)) => return Err(ProbeError::Broker { what: "reading answers", source }),
                        None => return Err(ProbeError::ConsumerEnded { what: "reply" }),
                    };
                    if ticket_of(&reply.properties).as_deref() != Some(ticket.as_str()) {
                        continue;
                    }
                    if let Some((from, whereabouts)) = read_answer(&reply.data, id) {
                        let done = node == Some(from.as_str());
                        answers.insert(from, whereabouts);
                        if done {
                            return Ok(answers);
                        }
                    }
                }
                event = self.events.next() => signs.push(self.sign(event, id)?),
            }
        }
    }

    fn sign(
        &self,
        event: Option<Result<lapin::message::Delivery, lapin::Error>>,
        id: &str,
    ) -> Result<Sign, ProbeError> {
        match event {
            Some(Ok(event)) => Ok(read_event(&event.data, id)),
            Some(Err(source)) => Err(ProbeError::Broker {
                what: "reading events",
                source,
            }),
            None => Err(ProbeError::ConsumerEnded { what: "event" }),
        }
    }

    /// Closes the probe's channel (its queues go with it).
    pub async fn close(self) {
        if self.channel.status().connected() {
            let _ = self.channel.close(200, "done".into()).await;
        }
    }

    /// Collects the events that arrive for `wait` into `signs`.
    async fn gather(
        &mut self,
        id: &str,
        wait: Duration,
        signs: &mut Vec<Sign>,
    ) -> Result<(), ProbeError> {
        let settle = tokio::time::sleep(wait);
        tokio::pin!(settle);
        loop {
            tokio::select! {
                _ = &mut settle => return Ok(()),
                event = self.events.next() => {
                    let sign = self.sign(event, id)?;
                    signs.push(sign);
                }
            }
        }
    }
}

/// One held redelivery's state, kept across the probes opened for it (a
/// probe that fails is replaced; the hold goes on).
#[derive(Debug)]
pub struct Hold {
    id: String,
    me: String,
    /// RESTART_GRACE: how long a watched node may be silent while this
    /// node hears the farm.
    grace: Duration,
    /// The node watched, once one was found running the task.
    watching: Option<String>,
    /// When a task nobody claims runs here.
    claim_until: Option<Instant>,
}

impl Hold {
    /// The hold of task `id` on node `me`.
    pub fn new(id: &str, me: &str, grace: Duration) -> Self {
        Self {
            id: id.to_owned(),
            me: me.to_owned(),
            grace,
            watching: None,
            claim_until: None,
        }
    }

    /// The node watched, if any.
    pub fn watching(&self) -> Option<&str> {
        self.watching.as_deref()
    }

    /// Applies the hold rules (see the module doc) with `probe` until a
    /// verdict; an error of the probe leaves the hold where it was.
    pub async fn decide(
        &mut self,
        probe: &mut Probe,
        view: &FarmView,
    ) -> Result<Verdict, ProbeError> {
        let id = self.id.clone();
        let me = self.me.clone();
        let mut signs = Vec::new();
        while self.watching.is_none() {
            let answers = probe.ask(&id, None, &mut signs).await?;
            view.answered(answers.keys());
            if let Some(node) = ended_in(&signs, &me) {
                return Ok(Verdict::EndedElsewhere { node });
            }
            match claim(&answers, &me) {
                Claim::Ended { node } => return Ok(Verdict::EndedElsewhere { node }),
                Claim::Held { node } => {
                    tracing::info!(
                        node = %node,
                        "redelivered message for a task running on another node; holding it without running it \
                         until that task ends there"
                    );
                    self.watching = Some(node);
                }
                Claim::Nobody => match view.who_runs(&id).filter(|n| *n != me) {
                    Some(node) => {
                        tracing::info!(
                            node = %node,
                            silent_s = view.silence_of(&node).as_secs(),
                            restart_grace_s = self.grace.as_secs(),
                            "redelivered message for a task last seen running on another node, which is \
                             silent; holding it without running it unless that node stays silent for \
                             RESTART_GRACE while this node hears the farm"
                        );
                        self.watching = Some(node);
                    }
                    None => {
                        let until = *self.claim_until.get_or_insert(Instant::now() + CLAIM_GRACE);
                        if Instant::now() >= until {
                            return Ok(Verdict::RunHere {
                                why: format!(
                                    "no node has it or was seen running it ({} answered, asked for {} s)",
                                    answers.len(),
                                    CLAIM_GRACE.as_secs()
                                ),
                            });
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
            }
        }
        let node = self.watching.clone().expect("a node is watched");
        // Watch that node: the task's final event, its answers, its
        // goodbye, and its silence as the view counts it.
        let mut poll = tokio::time::interval(POLL_EVERY);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut look = tokio::time::interval(Duration::from_secs(1));
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut offline = view.let_go(&node);
            for sign in std::mem::take(&mut signs) {
                match sign {
                    Sign::Ended { node: from } if from != me => {
                        return Ok(Verdict::EndedElsewhere { node: from });
                    }
                    Sign::Leaving { node: from } if from == node => {
                        tracing::info!(
                            node = %node,
                            "the node running the task went offline keeping it for its next start; \
                             still holding its redelivered message"
                        );
                    }
                    Sign::Offline { node: from } if from == node => offline = true,
                    _ => {}
                }
            }
            if offline {
                // Its final events went before its goodbye; a last look
                // for one, then nobody runs it.
                let answers = probe.ask(&id, Some(&node), &mut signs).await?;
                if let Some(ended) = ended_in(&signs, &me) {
                    return Ok(Verdict::EndedElsewhere { node: ended });
                }
                match answers.get(&node) {
                    Some(Whereabouts::Ended) => return Ok(Verdict::EndedElsewhere { node }),
                    // Back already, with the task.
                    Some(Whereabouts::Held { .. }) => view.answered([&node]),
                    _ => {
                        return Ok(Verdict::RunHere {
                            why: format!("{node} went offline without ending it"),
                        });
                    }
                }
            }
            let silent = view.silence_of(&node);
            if silent >= self.grace {
                return Ok(Verdict::RunHere {
                    why: format!(
                        "{node} was silent for {} s (RESTART_GRACE {} s) while this node heard the farm",
                        silent.as_secs(),
                        self.grace.as_secs()
                    ),
                });
            }
            tokio::select! {
                event = probe.events.next() => {
                    let sign = probe.sign(event, &id)?;
                    signs.push(sign);
                }
                _ = look.tick() => {}
                _ = poll.tick() => {
                    let answers = probe.ask(&id, Some(&node), &mut signs).await?;
                    view.answered(answers.keys());
                    match answers.get(&node) {
                        Some(Whereabouts::Ended) => return Ok(Verdict::EndedElsewhere { node }),
                        Some(Whereabouts::Absent) => {
                            // A final event sent just before the answer may
                            // still be on its way.
                            probe.gather(&id, Duration::from_secs(1), &mut signs).await?;
                            if let Some(ended) = ended_in(&signs, &me) {
                                return Ok(Verdict::EndedElsewhere { node: ended });
                            }
                            return Ok(Verdict::RunHere {
                                why: format!("{node} answers but no longer has it, and never ended it"),
                            });
                        }
                        Some(Whereabouts::Held { .. }) | None => {}
                    }
                }
            }
        }
    }
}

/// Decides what to do with a held redelivery of task `id` on node `me`
/// (see the module doc), asking the farm on `connection`. `over` fires
/// when the message went back to the broker (this node's session ended,
/// or it shuts down). A probe that fails is opened again after
/// [`RETRY_EVERY`], the hold going on where it was: an error is never a
/// verdict.
pub async fn resolve(
    connection: &Connection,
    view: &FarmView,
    id: &str,
    grace: Duration,
    over: &CancellationToken,
) -> Verdict {
    let mut hold = Hold::new(id, view.me(), grace);
    let mut said: HashSet<&'static str> = HashSet::new();
    loop {
        if over.is_cancelled() {
            return Verdict::Returned;
        }
        let attempt = async {
            let mut probe = Probe::open(connection).await?;
            let verdict = hold_on(&mut hold, &mut probe, view, over).await;
            probe.close().await;
            verdict
        };
        let error = match attempt.await {
            Ok(verdict) => return verdict,
            Err(error) => error,
        };
        if over.is_cancelled() {
            return Verdict::Returned;
        }
        if said.insert(error.what()) {
            tracing::warn!(
                %error,
                watching = hold.watching().unwrap_or("-"),
                "still holding the redelivered message; asking the farm again in 2 s"
            );
        } else {
            tracing::debug!(%error, "asking the farm failed again; retrying");
        }
        tokio::select! {
            _ = over.cancelled() => return Verdict::Returned,
            _ = tokio::time::sleep(RETRY_EVERY) => {}
        }
    }
}

/// The hold's rules until a verdict, or [`Verdict::Returned`] when `over`
/// fires first.
async fn hold_on(
    hold: &mut Hold,
    probe: &mut Probe,
    view: &FarmView,
    over: &CancellationToken,
) -> Result<Verdict, ProbeError> {
    tokio::select! {
        _ = over.cancelled() => Ok(Verdict::Returned),
        verdict = hold.decide(probe, view) => verdict,
    }
}

/// Whether a task that runs here is still this node's to end, as
/// [`taken_over`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// Go on: no deaf episode since the task started, or the farm says
    /// nobody else has it.
    Ours,
    /// `node` holds or ended it: drop it here.
    TakenOver { node: String },
    /// The worker stops before the farm could be asked.
    Unknown,
}

/// Whether another node took task `id` over while this node could not
/// hear the farm: asked before a task that runs here uploads or sends its
/// final event. `noted`: the deaf episodes the view had counted when the
/// task started. Nothing is asked unless a deaf episode happened since (or
/// one is open); then it waits until this node hears the farm again and
/// asks `query_task` once, again every [`RETRY_EVERY`] while that fails,
/// until `stop` fires. When the task is still ours, `noted` moves on to the
/// episodes counted now (the next check asks only after another one).
pub async fn taken_over(
    view: &FarmView,
    id: &str,
    noted: &AtomicU64,
    stop: &CancellationToken,
) -> Ownership {
    let Some(deaf) = view.deaf_since(noted.load(Ordering::SeqCst)) else {
        return Ownership::Ours;
    };
    tracing::warn!(
        deaf_s = deaf.as_secs(),
        "this node could not hear the farm for a long while since the task started; asking the farm \
         whether another node took it over before going on"
    );
    let ask = async {
        loop {
            let connection = view.hearing().await;
            let asked = async {
                let mut probe = Probe::open(&connection).await?;
                let answers = probe.ask(id, None, &mut Vec::new()).await;
                probe.close().await;
                answers
            };
            match asked.await {
                Ok(answers) => {
                    view.answered(answers.keys());
                    return match claim(&answers, view.me()) {
                        Claim::Ended { node } | Claim::Held { node } => {
                            Ownership::TakenOver { node }
                        }
                        Claim::Nobody => {
                            tracing::info!("no other node has the task; going on");
                            noted.store(view.episodes(), Ordering::SeqCst);
                            Ownership::Ours
                        }
                    };
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot ask the farm about the task yet; retrying in 2 s");
                    tokio::time::sleep(RETRY_EVERY).await;
                }
            }
        }
    };
    tokio::select! {
        _ = stop.cancelled() => Ownership::Unknown,
        ownership = ask => ownership,
    }
}

/// The node whose final event for the task is among `signs`, if any.
fn ended_in(signs: &[Sign], me: &str) -> Option<String> {
    signs.iter().find_map(|s| match s {
        Sign::Ended { node } if node != me => Some(node.clone()),
        _ => None,
    })
}

/// The `ticket` header of a pidbox reply.
fn ticket_of(properties: &BasicProperties) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get("ticket")? {
        AMQPValue::LongString(s) => Some(long_string(s)),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn long_string(s: &LongString) -> String {
    String::from_utf8_lossy(s.as_bytes()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(list: &[(&str, Whereabouts)]) -> Answers {
        list.iter()
            .map(|(n, w)| ((*n).to_owned(), w.clone()))
            .collect()
    }

    fn held() -> Whereabouts {
        Whereabouts::Held {
            state: "active".to_owned(),
        }
    }

    #[test]
    fn an_end_anywhere_wins_over_a_node_holding_it() {
        let a = answers(&[("a@x", held()), ("b@x", Whereabouts::Ended)]);
        assert_eq!(
            claim(&a, "me@x"),
            Claim::Ended {
                node: "b@x".to_owned()
            }
        );
    }

    #[test]
    fn a_node_running_it_holds_the_message_here() {
        let a = answers(&[("a@x", held()), ("c@x", Whereabouts::Absent)]);
        assert_eq!(
            claim(&a, "me@x"),
            Claim::Held {
                node: "a@x".to_owned()
            }
        );
    }

    #[test]
    fn this_node_and_nodes_without_it_claim_nothing() {
        let a = answers(&[("me@x", held()), ("c@x", Whereabouts::Absent)]);
        assert_eq!(claim(&a, "me@x"), Claim::Nobody);
        assert_eq!(claim(&Answers::new(), "me@x"), Claim::Nobody);
    }

    #[test]
    fn answers_are_read_as_celery_shapes_them() {
        let body = br#"{"a@x": {"t1": ["active", {"id": "t1"}]}}"#;
        assert_eq!(read_answer(body, "t1"), Some(("a@x".to_owned(), held())));
        let ready = br#"{"a@x": {"t1": ["ready", {"id": "t1"}]}}"#;
        assert_eq!(
            read_answer(ready, "t1"),
            Some(("a@x".to_owned(), Whereabouts::Ended))
        );
        assert_eq!(
            read_answer(br#"{"a@x": {}}"#, "t1"),
            Some(("a@x".to_owned(), Whereabouts::Absent))
        );
        assert_eq!(read_answer(b"not json", "t1"), None);
        assert_eq!(read_answer(b"{}", "t1"), None);
    }

    #[test]
    fn events_are_read_for_the_held_task_only() {
        let done = br#"{"type": "task-succeeded", "hostname": "a@x", "uuid": "t1"}"#;
        assert_eq!(
            read_event(done, "t1"),
            Sign::Ended {
                node: "a@x".to_owned()
            }
        );
        assert_eq!(read_event(done, "t2"), Sign::Other);
        // Heartbeats are the view's, not the probe's.
        let beat = br#"{"type": "worker-heartbeat", "hostname": "a@x"}"#;
        assert_eq!(read_event(beat, "t1"), Sign::Other);
        let bye = br#"{"type": "worker-offline", "hostname": "a@x"}"#;
        assert_eq!(
            read_event(bye, "t1"),
            Sign::Offline {
                node: "a@x".to_owned()
            }
        );
        assert_eq!(read_event(b"[1]", "t1"), Sign::Other);
    }

    #[test]
    fn a_goodbye_that_keeps_the_held_task_is_no_let_go() {
        let keeps = br#"{"type": "worker-offline", "hostname": "a@x", "kept": ["t0", "t1"]}"#;
        assert_eq!(
            read_event(keeps, "t1"),
            Sign::Leaving {
                node: "a@x".to_owned()
            }
        );
        // Another task kept, or none: the held one is let go.
        assert_eq!(
            read_event(keeps, "t2"),
            Sign::Offline {
                node: "a@x".to_owned()
            }
        );
        let none = br#"{"type": "worker-offline", "hostname": "a@x", "kept": []}"#;
        assert_eq!(
            read_event(none, "t1"),
            Sign::Offline {
                node: "a@x".to_owned()
            }
        );
        // A malformed list reads as no event at all, never as a let-go.
        let odd = br#"{"type": "worker-offline", "hostname": "a@x", "kept": "t1"}"#;
        assert_eq!(read_event(odd, "t1"), Sign::Other);
    }

    #[test]
    fn this_nodes_own_final_event_is_no_end_elsewhere() {
        let signs = [
            Sign::Ended {
                node: "me@x".to_owned(),
            },
            Sign::Other,
        ];
        assert_eq!(ended_in(&signs, "me@x"), None);
        assert_eq!(ended_in(&signs, "b@x"), Some("me@x".to_owned()));
    }
}
