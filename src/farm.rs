//! What the rest of the farm does with a task: asked when a *redelivered*
//! message arrives for a task this node neither runs nor ended, so that a
//! task runs once in the farm however often the broker redelivers it.
//!
//! RabbitMQ requeues a message whose delivery stayed unacked past its
//! `consumer_timeout` (30 min by default) while the node that got it keeps
//! running the task; any idle node may then receive it. The receiver holds
//! it without starting it and asks the farm, with Celery's own
//! `query_task` broadcast (nothing new on the wire), whether a live node
//! has that id:
//!
//! - a node that ended it (`ready`: ending, or in its record of ended
//!   tasks): the message is acked here, the task is not run again;
//! - a node that runs it (or holds it for its `eta`): the message stays
//!   held here while that node lives. It is acked when that task's final
//!   event passes on `celeryev`, or when that node, still answering, says
//!   the task is `ready`. It is run here only when that node, still
//!   answering, no longer has it and no final event came (it was stopped
//!   by a shutdown, or the node restarted), or when the node stops beating
//!   and answering for [`ORPHAN_AFTER`]. A `worker-offline` of that node
//!   whose `kept` lists the task (it left its scrape running for its next
//!   start, SIGTERM) is not a let-go: the node is taken as still running it,
//!   its silence counted from that goodbye;
//! - nobody (asked again for [`CLAIM_GRACE`], so a node that is slow to
//!   answer or reconnecting is heard): it runs here, as before.
//!
//! Holding is itself subject to the timeout: when this node's channel is
//! closed the held message goes back to the broker (nothing is lost), and
//! the next receiver applies the same rule.
//!
//! Owns the probe: one channel per held message on the session's
//! connection, with a reply queue for `query_task` and an exclusive queue
//! of the farm's final task events and worker heartbeats. It must not ack,
//! run or decide anything about the held message itself: the worker does,
//! from the [`Verdict`].

use std::collections::BTreeMap;
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
/// A node that neither beats nor answers for this long is taken for dead:
/// five missed heartbeats (Celery's own expiry is two; a node that
/// reconnects after a broker blip must not lose its task to a holder).
pub const ORPHAN_AFTER: Duration = Duration::from_secs(10);

/// The routing keys of `celeryev` the probe listens to.
const WATCHED_EVENTS: [&str; 5] = [
    "task.succeeded",
    "task.failed",
    "task.revoked",
    "worker.heartbeat",
    "worker.offline",
];

/// What became of a held redelivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No live node has the task, or its node let it go unfinished: run it
    /// here.
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
    /// `node` is alive.
    Beat {
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
        "worker-heartbeat" => Sign::Beat {
            node: seen.hostname,
        },
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
    me: String,
}

impl Probe {
    /// Opens the probe on `connection` for node `me`: the event queue is
    /// bound before any question is asked, so no final event sent after
    /// the first answer can pass unseen.
    pub async fn open(connection: &Connection, me: &str) -> Result<Self, ProbeError> {
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
            me: me.to_owned(),
        })
    }

    /// Asks `query_task` about `id` of every node, or of `node` only, and
    /// collects answers for [`QUERY_WINDOW`] (or until `node` answered).
    /// Events that arrive meanwhile go to `signs`.
    async fn ask(
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

    /// Decides what to do with a held redelivery of task `id`: see the
    /// module doc. `session_over` fires when the message went back to the
    /// broker (this node's session ended, or it shuts down).
    pub async fn resolve(
        mut self,
        id: &str,
        session_over: &CancellationToken,
    ) -> Result<Verdict, ProbeError> {
        let verdict = tokio::select! {
            _ = session_over.cancelled() => Ok(Verdict::Returned),
            verdict = self.decide(id) => verdict,
        };
        if self.channel.status().connected() {
            let _ = self.channel.close(200, "done".into()).await;
        }
        verdict
    }

    async fn decide(&mut self, id: &str) -> Result<Verdict, ProbeError> {
        let me = self.me.clone();
        let mut signs = Vec::new();
        // Who has it? Asked again while nobody claims it, for CLAIM_GRACE.
        let grace = Instant::now() + CLAIM_GRACE;
        let node = loop {
            let answers = self.ask(id, None, &mut signs).await?;
            if let Some(node) = ended_in(&signs, &me) {
                return Ok(Verdict::EndedElsewhere { node });
            }
            match claim(&answers, &me) {
                Claim::Ended { node } => return Ok(Verdict::EndedElsewhere { node }),
                Claim::Held { node } => break node,
                Claim::Nobody if Instant::now() >= grace => {
                    return Ok(Verdict::RunHere {
                        why: format!(
                            "no live node has it ({} answered in {} s)",
                            answers.len(),
                            CLAIM_GRACE.as_secs()
                        ),
                    });
                }
                Claim::Nobody => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        };
        tracing::info!(
            node = %node,
            "redelivered message for a task running on another node; holding it without running it \
             until that task ends there"
        );
        // Watch that node: its final event, its heartbeats, its answers.
        let mut alive = Instant::now();
        let mut poll = tokio::time::interval(POLL_EVERY);
        poll.tick().await;
        loop {
            let pending = std::mem::take(&mut signs);
            for sign in pending {
                match sign {
                    Sign::Ended { node: from } if from != me => {
                        return Ok(Verdict::EndedElsewhere { node: from });
                    }
                    Sign::Beat { node: from } if from == node => alive = Instant::now(),
                    Sign::Leaving { node: from } if from == node => {
                        tracing::info!(
                            node = %node,
                            "the node running the task went offline keeping it for its next start; \
                             still holding its redelivered message"
                        );
                        alive = Instant::now();
                    }
                    Sign::Offline { node: from } if from == node => {
                        // Its final events went before its goodbye; a
                        // last look for one, then nobody runs it.
                        let answers = self.ask(id, Some(&node), &mut signs).await?;
                        if let Some(ended) = ended_in(&signs, &me) {
                            return Ok(Verdict::EndedElsewhere { node: ended });
                        }
                        if let Some(Whereabouts::Ended) = answers.get(&node) {
                            return Ok(Verdict::EndedElsewhere { node });
                        }
                        return Ok(Verdict::RunHere {
                            why: format!("{node} went offline without ending it"),
                        });
                    }
                    _ => {}
                }
            }
            if alive.elapsed() >= ORPHAN_AFTER {
                return Ok(Verdict::RunHere {
                    why: format!(
                        "{node} neither beat nor answered for {} s",
                        ORPHAN_AFTER.as_secs()
                    ),
                });
            }
            tokio::select! {
                event = self.events.next() => {
                    let sign = self.sign(event, id)?;
                    signs.push(sign);
                }
                _ = poll.tick() => {
                    let answers = self.ask(id, Some(&node), &mut signs).await?;
                    match answers.get(&node) {
                        Some(Whereabouts::Held { .. }) => alive = Instant::now(),
                        Some(Whereabouts::Ended) => return Ok(Verdict::EndedElsewhere { node }),
                        Some(Whereabouts::Absent) => {
                            // A final event sent just before the answer may
                            // still be on its way.
                            let settle = tokio::time::sleep(Duration::from_secs(1));
                            tokio::pin!(settle);
                            loop {
                                tokio::select! {
                                    _ = &mut settle => break,
                                    event = self.events.next() => {
                                        let sign = self.sign(event, id)?;
                                        signs.push(sign);
                                    }
                                }
                            }
                            if let Some(ended) = ended_in(&signs, &me) {
                                return Ok(Verdict::EndedElsewhere { node: ended });
                            }
                            return Ok(Verdict::RunHere {
                                why: format!("{node} answers but no longer has it, and never ended it"),
                            });
                        }
                        None => {}
                    }
                }
            }
        }
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
        let beat = br#"{"type": "worker-heartbeat", "hostname": "a@x"}"#;
        assert_eq!(
            read_event(beat, "t1"),
            Sign::Beat {
                node: "a@x".to_owned()
            }
        );
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
            Sign::Beat {
                node: "a@x".to_owned(),
            },
        ];
        assert_eq!(ended_in(&signs, "me@x"), None);
        assert_eq!(ended_in(&signs, "b@x"), Some("me@x".to_owned()));
    }
}
