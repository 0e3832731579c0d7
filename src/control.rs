//! Remote control (SPEC §6): the pidbox commands that `celery inspect`,
//! `celery control`, `celery status` and Flower send, turned into worker
//! actions, and their replies in the shapes Celery 5 gives.
//!
//! Owns the node's pidbox consumer (one tokio task per broker session, apart
//! from the task consumer: a slow reply never delays a task), the dispatch of
//! commands, and [`RevokedSet`], Celery's bounded memory of revoked task ids.
//! It must not block the task consumer nor touch tasks itself: it asks the
//! worker through [`Panel`]. Wire shapes live in [`crate::celery::control`].
//!
//! A request runs when its `destination` is null or names this node; a
//! reply `{"<node>": reply}` goes to its `reply_to`. A malformed request is
//! logged and ignored; an unknown command gets Celery's
//! `{"error": "KeyError('<method>')"}`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel, Connection};
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::signal::Signal;
use nix::sys::time::TimeVal;
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::broker::{
    Broker, BrokerError, CONNECT_TIMEOUT, CONTROL_QUEUE_EXPIRES_MS, CONTROL_QUEUE_TTL_MS,
    ControlChannel, EVENT_EXCHANGE, TaskQueue, publish_reply,
};
use crate::celery::control::{
    BrokerInfo, DeliveryInfo, HelloReply, PoolInfo, QueueInfo, RequestInfo, Rusage, ScheduledInfo,
    Stats, exception, nok, ok,
};
use crate::celery::{TaskRequest, decode_control, encode_control_reply, iso8601, repr_str};
use crate::config::{Config, QueueName};
use crate::events::EventSink;
use crate::offliner::Offliner;
use crate::retry::Retry;

/// Celery's `REVOKES_MAX`: revoked ids remembered.
pub const REVOKES_MAX: usize = 50_000;
/// Celery's `REVOKE_EXPIRES`: how long a revoked id is remembered.
pub const REVOKE_EXPIRES: Duration = Duration::from_secs(10_800);

/// The ids of revoked tasks, as Celery's `worker_state.revoked` (a
/// `LimitedSet`): at most `max` ids, each forgotten `expires` after it was
/// (last) added, the oldest first when full. A task whose id is here is
/// never run: it ends `task-revoked` as soon as its message arrives.
#[derive(Debug)]
pub struct RevokedSet {
    max: usize,
    expires: Duration,
    /// Oldest first.
    order: VecDeque<(Instant, String)>,
    ids: HashMap<String, Instant>,
}

impl Default for RevokedSet {
    fn default() -> Self {
        Self::new(REVOKES_MAX, REVOKE_EXPIRES)
    }
}

impl RevokedSet {
    pub fn new(max: usize, expires: Duration) -> Self {
        Self {
            max,
            expires,
            order: VecDeque::new(),
            ids: HashMap::new(),
        }
    }

    /// Adds `id` (again: it becomes the newest) as of `now`.
    pub fn insert(&mut self, id: &str, now: Instant) {
        if self.ids.insert(id.to_owned(), now).is_some() {
            // Rare (an id revoked twice): a linear pass is fine.
            self.order.retain(|(_, known)| known != id);
        }
        self.order.push_back((now, id.to_owned()));
        self.purge(now);
    }

    /// Whether `id` was revoked and is still remembered at `now`.
    pub fn contains(&self, id: &str, now: Instant) -> bool {
        self.ids
            .get(id)
            .is_some_and(|added| now.saturating_duration_since(*added) < self.expires)
    }

    /// The ids remembered at `now`, oldest first.
    pub fn ids(&mut self, now: Instant) -> Vec<String> {
        self.purge(now);
        self.order.iter().map(|(_, id)| id.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Forgets expired ids, then the oldest beyond `max`.
    fn purge(&mut self, now: Instant) {
        while let Some((added, _)) = self.order.front() {
            let expired = now.saturating_duration_since(*added) >= self.expires;
            if !expired && self.order.len() <= self.max {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.ids.remove(&id);
            }
        }
    }
}

/// Where a task held here is in its life, in Celery's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskPhase {
    /// Held until its `eta` (`inspect scheduled`).
    Scheduled,
    /// Waiting for a free slot (`inspect reserved`).
    Reserved,
    /// Running (`inspect active`).
    Active,
    /// Ended; its message is acked once the broker confirmed its final
    /// event. Listed nowhere, as in Celery.
    Ending,
}

/// One task held or running here, as remote control sees it.
#[derive(Debug, Clone)]
pub struct TaskSnapshot {
    pub request: Arc<TaskRequest>,
    pub phase: TaskPhase,
    /// Epoch seconds when it started running.
    pub time_start: Option<f64>,
    pub delivery: DeliveryInfo,
}

/// Figures of the worker that `inspect stats` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerFacts {
    pub pid: u32,
    pub uptime: Duration,
    /// The prefetch count in force now.
    pub prefetch_count: u16,
    /// Tasks started since the worker started, by task name.
    pub total: BTreeMap<String, u64>,
    /// The heartbeat negotiated with the broker (seconds), when connected.
    pub heartbeat: Option<u16>,
}

/// What remote control may ask of the worker (implemented by
/// [`crate::worker::Worker`]).
pub trait Panel: Send + Sync + 'static {
    fn config(&self) -> &Config;
    /// The event sink: identity, Lamport clock, task events on/off.
    fn events(&self) -> &EventSink;
    fn facts(&self) -> WorkerFacts;
    /// Every task held or running here.
    fn tasks(&self) -> Vec<TaskSnapshot>;
    /// Whether task `id` ended here (the on-disk record of ended tasks).
    fn ended(&self, id: &str) -> bool;
    /// Remembers `ids` as revoked (a task that arrives later never runs)
    /// and stops those held here: a task not started yet never runs; a
    /// running one is stopped (its containers killed) only with
    /// `terminate` (the signal number to report). Returns the ids of the
    /// tasks found here, as Celery's `terminate: ...` reply lists them.
    fn revoke(&self, ids: &[String], terminate: Option<i32>) -> Vec<String>;
    /// The revoked ids remembered, oldest first.
    fn revoked(&self) -> Vec<String>;
    /// Adds ids revoked elsewhere (mingle's `hello`).
    fn merge_revoked(&self, ids: &[String]);
    /// The task queues consumed now.
    fn queues(&self) -> Vec<TaskQueue>;
    /// Starts consuming a queue (declared first); `Ok(false)` when it was
    /// consumed already.
    fn add_queue(&self, queue: TaskQueue)
    -> impl Future<Output = Result<bool, BrokerError>> + Send;
    /// Stops consuming a queue; `Ok(false)` when it was not consumed.
    fn cancel_queue(&self, name: &str) -> impl Future<Output = Result<bool, BrokerError>> + Send;
    /// Sends a `worker-heartbeat` now.
    fn heartbeat(&self);
    /// Shuts the worker down as SIGTERM does.
    fn shutdown(&self);
    /// Another worker took this node's pidbox queue: stop with
    /// [`crate::worker::WorkerError::NodeInUse`].
    fn node_in_use(&self);
}

/// What to do once a command's reply is out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Nothing,
    /// `shutdown`: the reply goes first, then the worker stops.
    Shutdown,
}

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
pub async fn serve<P: Panel>(panel: P, session: ControlSession, stop: CancellationToken) {
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
                match handle(&panel, &control.channel, &mut declared, delivery).await {
                    Ok(After::Shutdown) => panel.shutdown(),
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
        match reopen(&panel, &broker, &connection, &stop).await {
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
async fn reopen<P: Panel>(
    panel: &P,
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
                panel.node_in_use();
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
async fn handle<P: Panel>(
    panel: &P,
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
    let events = panel.events();
    // As Celery's pidbox: forward the clock, merge the sender's.
    match header_u64(&delivery.properties, "clock") {
        Some(theirs) => events.clock().adjust(theirs),
        None => events.clock().forward(),
    };
    let hostname = events.hostname();
    if !request.is_for(hostname) {
        return Ok(After::Nothing);
    }
    let (reply, after) = dispatch(panel, &request.method, &request.arguments).await;
    tracing::debug!(method = %request.method, reply = %reply, "remote-control command");
    if let Some(to) = &request.reply_to
        && (to.exchange.len() > 255 || to.routing_key.len() > 255)
    {
        // AMQP short strings hold 255 bytes; lapin's `ShortString::from`
        // panics on longer ones, which killed the worker.
        tracing::warn!(
            method = %request.method,
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

/// Runs one command; returns its reply (Celery's shape) and what to do
/// once the reply is out.
pub async fn dispatch<P: Panel>(
    panel: &P,
    method: &str,
    arguments: &Map<String, Value>,
) -> (Value, After) {
    let reply = match method {
        "ping" => ok("pong"),
        "revoke" => match parse::<RevokeArgs>(method, arguments) {
            Ok(args) => revoke(panel, args.task_id, args.terminate, args.signal.as_ref()),
            Err(reply) => reply,
        },
        "terminate" => match parse::<TerminateArgs>(method, arguments) {
            Ok(args) => revoke(panel, args.task_id, true, args.signal.as_ref()),
            Err(reply) => reply,
        },
        "shutdown" => {
            tracing::warn!("shutdown requested by remote control");
            return (ok("shutting down"), After::Shutdown);
        }
        "stats" => to_value(&stats(panel)),
        "active" | "dump_active" => match parse::<InspectArgs>(method, arguments) {
            Ok(args) => to_value(&requests(panel, TaskPhase::Active, args.safe)),
            Err(reply) => reply,
        },
        "reserved" | "dump_reserved" => to_value(&requests(panel, TaskPhase::Reserved, false)),
        "scheduled" | "dump_schedule" => to_value(&scheduled(panel)),
        "registered" | "dump_tasks" => json!(registered()),
        "active_queues" => to_value(&queue_infos(&panel.queues())),
        "revoked" | "dump_revoked" => json!(panel.revoked()),
        "query_task" => match parse::<QueryTaskArgs>(method, arguments) {
            Ok(args) => query_task(panel, &args.ids.map(Ids::into_vec).unwrap_or_default()),
            Err(reply) => reply,
        },
        "enable_events" => set_task_events(panel.events(), true),
        "disable_events" => set_task_events(panel.events(), false),
        "heartbeat" => {
            panel.heartbeat();
            Value::Null
        }
        "clock" => json!({"clock": panel.events().clock().value()}),
        "hello" => match parse::<HelloArgs>(method, arguments) {
            Ok(args) => hello(panel, args),
            Err(reply) => reply,
        },
        "add_consumer" => match parse::<AddConsumerArgs>(method, arguments) {
            Ok(args) => add_consumer(panel, args).await,
            Err(reply) => reply,
        },
        "cancel_consumer" => match parse::<CancelConsumerArgs>(method, arguments) {
            Ok(args) => cancel_consumer(panel, &args.queue).await,
            Err(reply) => reply,
        },
        "conf" | "dump_conf" => to_value(&conf(panel)),
        "report" => ok(report(panel)),
        // Gossip is off: nothing to elect, as Celery without gossip.
        "election" => Value::Null,
        "pool_grow" | "pool_shrink" => nok(format!(
            "{method} is not supported: the pool size is CONCURRENCY ({})",
            panel.config().concurrency
        )),
        "pool_restart" => exception("ValueError", "Pool restarts not enabled"),
        "autoscale" => exception("ValueError", "Autoscale not enabled"),
        "rate_limit" | "time_limit" => nok(format!(
            "{method} is not supported: limits come with each task message"
        )),
        _ => {
            tracing::warn!(method, "unknown remote-control command");
            exception("KeyError", method)
        }
    };
    (reply, After::Nothing)
}

fn to_value<T: Serialize>(value: &T) -> Value {
    // The reply types are plain structs of strings, numbers, lists and maps.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// A command's keyword arguments; a `TypeError` reply when they don't fit,
/// as Python would raise calling the handler. Unknown ones are ignored (the
/// handlers take `**kwargs`).
fn parse<T: DeserializeOwned>(method: &str, arguments: &Map<String, Value>) -> Result<T, Value> {
    serde_json::from_value(Value::Object(arguments.clone()))
        .map_err(|e| exception("TypeError", &format!("{method}(): {e}")))
}

/// One task id or a list of them (`maybe_list`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Ids {
    One(String),
    Many(Vec<String>),
}

impl Ids {
    /// The ids, duplicates dropped, in order.
    fn into_vec(self) -> Vec<String> {
        let ids = match self {
            Ids::One(id) => vec![id],
            Ids::Many(ids) => ids,
        };
        let mut seen = HashSet::new();
        ids.into_iter()
            .filter(|id| seen.insert(id.clone()))
            .collect()
    }
}

/// A flag as Python reads it (`if terminate:`): Flower sends `1`, the
/// command line `True`, others `"true"`.
fn truthy<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::Null => false,
        Value::Bool(b) => b,
        Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    })
}

#[derive(Debug, Deserialize)]
struct RevokeArgs {
    #[serde(default)]
    task_id: Option<Ids>,
    #[serde(default, deserialize_with = "truthy")]
    terminate: bool,
    #[serde(default)]
    signal: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct TerminateArgs {
    #[serde(default)]
    task_id: Option<Ids>,
    #[serde(default)]
    signal: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct InspectArgs {
    #[serde(default, deserialize_with = "truthy")]
    safe: bool,
}

#[derive(Debug, Deserialize)]
struct QueryTaskArgs {
    #[serde(default)]
    ids: Option<Ids>,
}

/// Ids as a list (Celery 5.7) or as a map id → timestamp (earlier 5.x).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RevokedIds {
    List(Vec<String>),
    Map(Map<String, Value>),
}

#[derive(Debug, Deserialize)]
struct HelloArgs {
    from_node: String,
    #[serde(default)]
    revoked: Option<RevokedIds>,
}

#[derive(Debug, Deserialize)]
struct AddConsumerArgs {
    queue: String,
    #[serde(default)]
    exchange: Option<String>,
    #[serde(default)]
    exchange_type: Option<String>,
    #[serde(default)]
    routing_key: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CancelConsumerArgs {
    queue: String,
}

/// The names Python's `signal` module has beside the ones the C library
/// names alike (which `nix` parses).
const SIGNAL_ALIASES: [(&str, Signal); 3] = [
    ("IOT", Signal::SIGABRT),
    ("POLL", Signal::SIGIO),
    ("CLD", Signal::SIGCHLD),
];

/// Celery's `signals.signum()`: a number as is, an upper-case name with or
/// without `SIG`; none means `SIGTERM`. The error is the reply to send.
fn signum(signal: Option<&Value>) -> Result<i32, Value> {
    let name = match signal {
        None | Some(Value::Null) => return Ok(15),
        Some(Value::Number(n)) => {
            return n
                .as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .filter(|n| (1..=64).contains(n))
                .ok_or_else(|| exception("ValueError", &format!("invalid signal number {n}")));
        }
        Some(Value::String(name)) => name,
        Some(other) => {
            return Err(exception(
                "TypeError",
                &format!("signal must be a name or a number, not {other}"),
            ));
        }
    };
    if name.is_empty() || name.chars().any(|c| c.is_ascii_lowercase()) {
        return Err(exception(
            "TypeError",
            "signal name must be uppercase string.",
        ));
    }
    let bare = name.strip_prefix("SIG").unwrap_or(name);
    format!("SIG{bare}")
        .parse::<Signal>()
        .ok()
        .or_else(|| {
            SIGNAL_ALIASES
                .iter()
                .find(|(alias, _)| *alias == bare)
                .map(|(_, signal)| *signal)
        })
        .map(|signal| signal as i32)
        .ok_or_else(|| {
            exception(
                "AttributeError",
                &format!("module 'signal' has no attribute 'SIG{bare}'"),
            )
        })
}

/// `revoke` / `terminate`, replying as Celery 5 does.
fn revoke<P: Panel>(panel: &P, ids: Option<Ids>, terminate: bool, signal: Option<&Value>) -> Value {
    let ids = ids.map(Ids::into_vec).unwrap_or_default();
    let terminate = match terminate.then(|| signum(signal)).transpose() {
        Ok(terminate) => terminate,
        Err(reply) => return reply,
    };
    let found = panel.revoke(&ids, terminate);
    tracing::info!(ids = ?ids, ?terminate, found = ?found, "tasks revoked by remote control");
    match terminate {
        None => ok(format!("tasks {} flagged as revoked", python_set(&ids))),
        Some(_) if found.is_empty() => ok("terminate: tasks unknown"),
        Some(_) => ok(format!("terminate: {}", found.join(", "))),
    }
}

/// The Python repr of a set of strings: `{'a', 'b'}`, or `set()`.
fn python_set(ids: &[String]) -> String {
    if ids.is_empty() {
        return "set()".to_owned();
    }
    let items: Vec<String> = ids.iter().map(|id| repr_str(id)).collect();
    format!("{{{}}}", items.join(", "))
}

fn request_info(task: &TaskSnapshot, hostname: &str, pid: u32, safe: bool) -> RequestInfo {
    let request = &task.request;
    let (args, kwargs) = if safe {
        (
            Value::String(request.argsrepr.clone()),
            Value::String(request.kwargsrepr.clone()),
        )
    } else {
        (
            Value::Array(request.args.clone()),
            Value::Object(request.kwargs.clone()),
        )
    };
    RequestInfo {
        id: request.id.clone(),
        name: request.name.clone(),
        args,
        kwargs,
        task_type: request.name.clone(),
        hostname: hostname.to_owned(),
        time_start: task.time_start,
        acknowledged: false,
        delivery_info: task.delivery.clone(),
        worker_pid: task.time_start.map(|_| pid),
    }
}

/// `inspect active` / `inspect reserved`: the tasks in `phase`, oldest
/// start first.
fn requests<P: Panel>(panel: &P, phase: TaskPhase, safe: bool) -> Vec<RequestInfo> {
    let hostname = panel.events().hostname();
    let pid = std::process::id();
    let mut tasks: Vec<TaskSnapshot> = panel
        .tasks()
        .into_iter()
        .filter(|t| t.phase == phase)
        .collect();
    tasks.sort_by(|a, b| {
        a.time_start
            .unwrap_or(0.0)
            .total_cmp(&b.time_start.unwrap_or(0.0))
    });
    tasks
        .iter()
        .map(|t| request_info(t, hostname, pid, safe))
        .collect()
}

/// `inspect scheduled`: tasks held for their `eta`, soonest first.
fn scheduled<P: Panel>(panel: &P) -> Vec<ScheduledInfo> {
    let hostname = panel.events().hostname();
    let pid = std::process::id();
    let mut tasks: Vec<TaskSnapshot> = panel
        .tasks()
        .into_iter()
        .filter(|t| t.phase == TaskPhase::Scheduled)
        .collect();
    tasks.sort_by_key(|t| t.request.eta);
    tasks
        .iter()
        .map(|t| ScheduledInfo {
            eta: t.request.eta.as_ref().map(iso8601::format),
            priority: 6,
            request: request_info(t, hostname, pid, false),
        })
        .collect()
}

/// `query_task`: `{id: [state, info]}` for the given ids held here, and
/// `[ready, {id, hostname}]` for those in the record of ended tasks (Celery
/// answers `ready` only while it still has the request in memory; a node
/// holding a redelivery must learn that the task ended here, see
/// [`crate::farm`]).
fn query_task<P: Panel>(panel: &P, ids: &[String]) -> Value {
    let hostname = panel.events().hostname();
    let pid = std::process::id();
    let mut reply = Map::new();
    for task in panel.tasks() {
        if !ids.contains(&task.request.id) {
            continue;
        }
        let state = match task.phase {
            TaskPhase::Active => "active",
            TaskPhase::Reserved => "reserved",
            TaskPhase::Scheduled => "scheduled",
            TaskPhase::Ending => "ready",
        };
        reply.insert(
            task.request.id.clone(),
            json!([state, to_value(&request_info(&task, hostname, pid, false))]),
        );
    }
    for id in ids {
        if !reply.contains_key(id) && panel.ended(id) {
            reply.insert(
                id.clone(),
                json!(["ready", {"id": id, "hostname": hostname}]),
            );
        }
    }
    Value::Object(reply)
}

/// The registered task names, sorted (Celery lists its own built-ins only
/// on request).
fn registered() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Offliner::ALL.iter().map(|o| o.task_name()).collect();
    names.sort_unstable();
    names
}

fn queue_infos(queues: &[TaskQueue]) -> Vec<QueueInfo> {
    queues
        .iter()
        .map(|q| QueueInfo::durable(&q.name, &q.exchange, &q.exchange_type, &q.routing_key))
        .collect()
}

fn set_task_events(events: &EventSink, enable: bool) -> Value {
    let (verb, was) = if enable {
        ("enabled", events.is_enabled())
    } else {
        ("disabled", !events.is_enabled())
    };
    if was {
        return ok(format!("task events already {verb}"));
    }
    events.set_enabled(enable);
    tracing::info!("task events {verb} by remote control");
    ok(format!("task events {verb}"))
}

/// Mingle's `hello`: merge the sender's revoked ids, answer with ours and
/// our clock; nothing to say to ourselves.
fn hello<P: Panel>(panel: &P, args: HelloArgs) -> Value {
    if args.from_node == panel.events().hostname() {
        return Value::Null;
    }
    tracing::info!(from = %args.from_node, "sync with another node");
    let theirs: Vec<String> = match args.revoked {
        None => Vec::new(),
        Some(RevokedIds::List(ids)) => ids,
        Some(RevokedIds::Map(ids)) => ids.into_iter().map(|(id, _)| id).collect(),
    };
    if !theirs.is_empty() {
        panel.merge_revoked(&theirs);
    }
    to_value(&HelloReply {
        revoked: panel.revoked(),
        clock: panel.events().clock().forward(),
    })
}

/// The queue `add_consumer` means, as Celery's `add_task_queue` builds it:
/// a Zimfarm queue name (without an explicit exchange) is bound to the
/// `offliner` topic exchange like the configured ones; another name gets
/// an exchange of its own name, `direct`, routing key = queue name.
fn queue_for(args: &AddConsumerArgs) -> Result<TaskQueue, String> {
    let name = args.queue.trim();
    if name.is_empty() || name.len() > 255 {
        return Err("queue name must be 1 to 255 bytes".to_owned());
    }
    if args.exchange.is_none() && name.parse::<QueueName>().is_ok() {
        return Ok(TaskQueue::zimfarm(name));
    }
    for (what, value) in [
        ("exchange", &args.exchange),
        ("routing_key", &args.routing_key),
    ] {
        if value.as_ref().is_some_and(|v| v.len() > 255) {
            return Err(format!(
                "{what} must be at most 255 bytes (an AMQP short string)"
            ));
        }
    }
    let exchange_type = args.exchange_type.as_deref().unwrap_or("direct");
    if !["direct", "topic", "fanout", "headers"].contains(&exchange_type) {
        return Err(format!(
            "exchange_type {exchange_type:?} is not one of direct, topic, fanout, headers"
        ));
    }
    Ok(TaskQueue {
        name: name.to_owned(),
        exchange: args.exchange.clone().unwrap_or_else(|| name.to_owned()),
        exchange_type: exchange_type.to_owned(),
        routing_key: args.routing_key.clone().unwrap_or_else(|| name.to_owned()),
    })
}

async fn add_consumer<P: Panel>(panel: &P, args: AddConsumerArgs) -> Value {
    let queue = match queue_for(&args) {
        Ok(queue) => queue,
        Err(problem) => return nok(problem),
    };
    let name = queue.name.clone();
    match panel.add_queue(queue).await {
        Ok(added) => {
            if added {
                tracing::info!(queue = %name, "started consuming a queue, as remote control asked");
            }
            ok(format!("add consumer {name}"))
        }
        Err(error) => {
            tracing::warn!(queue = %name, %error, "add_consumer failed");
            nok(format!("cannot consume from {name}: {error}"))
        }
    }
}

async fn cancel_consumer<P: Panel>(panel: &P, queue: &str) -> Value {
    match panel.cancel_queue(queue).await {
        Ok(cancelled) => {
            if cancelled {
                tracing::info!(queue, "stopped consuming a queue, as remote control asked");
            }
            ok(format!("no longer consuming from {queue}"))
        }
        Err(error) => {
            tracing::warn!(queue, %error, "cancel_consumer failed");
            nok(format!("cannot stop consuming from {queue}: {error}"))
        }
    }
}

/// `inspect stats`.
fn stats<P: Panel>(panel: &P) -> Stats {
    let facts = panel.facts();
    let config = panel.config();
    Stats {
        total: facts.total,
        pid: facts.pid,
        clock: panel.events().clock().value().to_string(),
        uptime: facts.uptime.as_secs_f64().round() as u64,
        pool: PoolInfo {
            implementation: "zimfarm_worker:TokioTaskPool".to_owned(),
            max_concurrency: config.concurrency,
            processes: vec![facts.pid],
            max_tasks_per_child: "N/A".to_owned(),
            put_guarded_by_semaphore: true,
            timeouts: [0, 0],
        },
        broker: broker_info(config, facts.heartbeat),
        prefetch_count: facts.prefetch_count,
        rusage: rusage(),
    }
}

/// kombu's `Connection.info()` for BROKER_URL: never the password.
fn broker_info(config: &Config, heartbeat: Option<u16>) -> BrokerInfo {
    let uri = config.broker_url.uri();
    BrokerInfo {
        hostname: uri.authority.host.clone(),
        userid: uri.authority.userinfo.username.clone(),
        virtual_host: uri.vhost.clone(),
        port: uri.authority.port,
        insist: false,
        ssl: config.broker_url.is_tls(),
        transport: "amqp".to_owned(),
        connect_timeout: CONNECT_TIMEOUT.as_secs(),
        transport_options: Map::new(),
        login_method: uri
            .query
            .auth_mechanism
            .unwrap_or_default()
            .name()
            .to_owned(),
        uri_prefix: None,
        heartbeat: heartbeat.map(f64::from),
        failover_strategy: "round-robin".to_owned(),
        alternates: Vec::new(),
        credential_provider: None,
    }
}

/// The settings `inspect conf` shows: Celery's names for what this worker
/// does. The broker URL has its password masked, as Celery masks it.
#[derive(Debug, Serialize)]
struct Conf {
    broker_url: String,
    broker_connection_timeout: u64,
    task_acks_late: bool,
    task_queues: Vec<QueueInfo>,
    worker_concurrency: usize,
    worker_prefetch_multiplier: u32,
    worker_send_task_events: bool,
    event_exchange: &'static str,
    control_exchange: &'static str,
    control_queue_ttl: f64,
    control_queue_expires: f64,
    worker_revokes_max: usize,
    worker_revoke_expires: u64,
    shutdown_grace: f64,
    max_message_bytes: usize,
}

fn conf<P: Panel>(panel: &P) -> Conf {
    let config = panel.config();
    let uri = config.broker_url.uri();
    let scheme = if config.broker_url.is_tls() {
        "amqps"
    } else {
        "amqp"
    };
    Conf {
        broker_url: format!(
            "{scheme}://{}:********@{}:{}/{}",
            uri.authority.userinfo.username, uri.authority.host, uri.authority.port, uri.vhost
        ),
        broker_connection_timeout: CONNECT_TIMEOUT.as_secs(),
        task_acks_late: true,
        task_queues: queue_infos(&panel.queues()),
        worker_concurrency: config.concurrency,
        worker_prefetch_multiplier: 1,
        worker_send_task_events: panel.events().is_enabled(),
        event_exchange: EVENT_EXCHANGE,
        control_exchange: "celery",
        control_queue_ttl: f64::from(CONTROL_QUEUE_TTL_MS) / 1000.0,
        control_queue_expires: f64::from(CONTROL_QUEUE_EXPIRES_MS) / 1000.0,
        worker_revokes_max: REVOKES_MAX,
        worker_revoke_expires: REVOKE_EXPIRES.as_secs(),
        shutdown_grace: config.shutdown_grace.as_secs_f64(),
        max_message_bytes: config.max_message_bytes,
    }
}

fn report<P: Panel>(panel: &P) -> String {
    let identity = panel.events().identity();
    format!(
        "software -> {}:{} (Rust), Celery 5 protocol\nplatform -> system:{} arch:{}\nnode -> {}",
        identity.sw_ident,
        identity.sw_ver,
        identity.sw_sys,
        std::env::consts::ARCH,
        identity.hostname
    )
}

/// This process's resource usage: `getrusage(RUSAGE_SELF)`, a system call
/// that never blocks. Zeros if it fails.
fn rusage() -> Rusage {
    let Ok(usage) = getrusage(UsageWho::RUSAGE_SELF) else {
        return Rusage::default();
    };
    let seconds = |t: TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    let count = |n: libc::c_long| u64::try_from(n).unwrap_or(0);
    Rusage {
        utime: seconds(usage.user_time()),
        stime: seconds(usage.system_time()),
        maxrss: count(usage.max_rss()),
        ixrss: count(usage.shared_integral()),
        idrss: count(usage.unshared_data_integral()),
        isrss: count(usage.unshared_stack_integral()),
        minflt: count(usage.minor_page_faults()),
        majflt: count(usage.major_page_faults()),
        nswap: count(usage.full_swaps()),
        inblock: count(usage.block_reads()),
        oublock: count(usage.block_writes()),
        msgsnd: count(usage.ipc_sends()),
        msgrcv: count(usage.ipc_receives()),
        nsignals: count(usage.signals()),
        nvcsw: count(usage.voluntary_context_switches()),
        nivcsw: count(usage.involuntary_context_switches()),
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::broker::Outbox;
    use crate::celery::Identity;

    /// A worker stand-in that records what remote control asked of it.
    struct Fake {
        config: Config,
        events: EventSink,
        outbox: Arc<Outbox>,
        tasks: Vec<TaskSnapshot>,
        revoked: Mutex<RevokedSet>,
        revokes: Mutex<Vec<(Vec<String>, Option<i32>)>>,
        queues: Mutex<Vec<TaskQueue>>,
        heartbeats: AtomicUsize,
        shutdown: AtomicBool,
    }

    fn fake(tasks: Vec<TaskSnapshot>) -> Fake {
        let vars = [
            ("USERNAME", "alice"),
            ("PASSWORD", "s3cr3t"),
            ("WORKING_DIR", "/srv/zim"),
            ("NODE_NAME", "node1"),
            ("QUEUES", "small"),
            ("CONCURRENCY", "3"),
            (
                "BROKER_URL",
                "amqps://alice:s3cr3t@broker.example:5671/zimfarm",
            ),
        ];
        let config = Config::from_vars(
            vars.iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
        .expect("valid config");
        let outbox = Outbox::new(100);
        let identity = Identity {
            hostname: config.hostname(),
            pid: 42,
            sw_ident: "zimfarm-worker".into(),
            sw_ver: "0.1.0".into(),
            sw_sys: "Linux".into(),
        };
        Fake {
            events: EventSink::new(identity, outbox.clone()),
            outbox,
            queues: Mutex::new(vec![TaskQueue::zimfarm("small")]),
            config,
            tasks,
            revoked: Mutex::new(RevokedSet::default()),
            revokes: Mutex::new(Vec::new()),
            heartbeats: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
        }
    }

    impl Panel for Fake {
        fn config(&self) -> &Config {
            &self.config
        }
        fn events(&self) -> &EventSink {
            &self.events
        }
        fn facts(&self) -> WorkerFacts {
            WorkerFacts {
                pid: 42,
                uptime: Duration::from_millis(61_600),
                prefetch_count: 3,
                total: BTreeMap::from([("offliner.mwoffliner".to_owned(), 2)]),
                heartbeat: Some(60),
            }
        }
        fn tasks(&self) -> Vec<TaskSnapshot> {
            self.tasks.clone()
        }
        fn ended(&self, id: &str) -> bool {
            id == "long-gone"
        }
        fn revoke(&self, ids: &[String], terminate: Option<i32>) -> Vec<String> {
            self.revokes.lock().unwrap().push((ids.to_vec(), terminate));
            self.merge_revoked(ids);
            ids.iter()
                .filter(|id| self.tasks.iter().any(|t| &t.request.id == *id))
                .cloned()
                .collect()
        }
        fn revoked(&self) -> Vec<String> {
            self.revoked.lock().unwrap().ids(Instant::now())
        }
        fn merge_revoked(&self, ids: &[String]) {
            let mut revoked = self.revoked.lock().unwrap();
            for id in ids {
                revoked.insert(id, Instant::now());
            }
        }
        fn queues(&self) -> Vec<TaskQueue> {
            self.queues.lock().unwrap().clone()
        }
        async fn add_queue(&self, queue: TaskQueue) -> Result<bool, BrokerError> {
            let mut queues = self.queues.lock().unwrap();
            if queues.iter().any(|q| q.name == queue.name) {
                return Ok(false);
            }
            queues.push(queue);
            Ok(true)
        }
        async fn cancel_queue(&self, name: &str) -> Result<bool, BrokerError> {
            let mut queues = self.queues.lock().unwrap();
            let before = queues.len();
            queues.retain(|q| q.name != name);
            Ok(queues.len() != before)
        }
        fn heartbeat(&self) {
            self.heartbeats.fetch_add(1, Ordering::SeqCst);
        }
        fn shutdown(&self) {
            self.shutdown.store(true, Ordering::SeqCst);
        }
        fn node_in_use(&self) {}
    }

    fn task(id: &str, phase: TaskPhase, time_start: Option<f64>) -> TaskSnapshot {
        let text = json!({
            "task": "offliner.youtube", "id": id,
            "kwargs": {"flags": {"id": "UC1"}}, "eta": "2030-01-01T00:00:00+00:00",
        })
        .to_string();
        // A protocol 1 message: the whole request in the body.
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into());
        let request = crate::celery::decode(&properties, text.as_bytes()).expect("task message");
        TaskSnapshot {
            request: Arc::new(request),
            phase,
            time_start,
            delivery: DeliveryInfo {
                exchange: "offliner".into(),
                routing_key: "small".into(),
                priority: None,
                redelivered: false,
            },
        }
    }

    fn args(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    async fn run(panel: &Fake, method: &str, arguments: Value) -> Value {
        let (reply, after) = dispatch(panel, method, &args(arguments)).await;
        assert_eq!(after, After::Nothing, "{method}");
        reply
    }

    #[tokio::test]
    async fn ping_and_unknown_commands() {
        let panel = fake(Vec::new());
        assert_eq!(run(&panel, "ping", json!({})).await, json!({"ok": "pong"}));
        assert_eq!(
            run(&panel, "no_such", json!({})).await,
            json!({"error": "KeyError('no_such')"})
        );
        assert_eq!(
            run(&panel, "autoscale", json!({"max": 3})).await,
            json!({"error": "ValueError('Autoscale not enabled')"})
        );
    }

    #[tokio::test]
    async fn revoke_replies_as_celery() {
        let panel = fake(vec![task("run1", TaskPhase::Active, Some(1.0))]);
        assert_eq!(
            run(&panel, "revoke", json!({"task_id": "abc"})).await,
            json!({"ok": "tasks {'abc'} flagged as revoked"})
        );
        assert_eq!(
            run(&panel, "revoke", json!({"task_id": ["a1", "a2", "a1"]})).await,
            json!({"ok": "tasks {'a1', 'a2'} flagged as revoked"})
        );
        assert_eq!(
            run(
                &panel,
                "revoke",
                json!({"task_id": "zzz", "terminate": true, "signal": "SIGKILL"})
            )
            .await,
            json!({"ok": "terminate: tasks unknown"})
        );
        assert_eq!(
            run(
                &panel,
                "revoke",
                json!({"task_id": "run1", "terminate": true, "signal": "KILL"})
            )
            .await,
            json!({"ok": "terminate: run1"})
        );
        assert_eq!(
            run(&panel, "terminate", json!({"task_id": "run1", "signal": 2})).await,
            json!({"ok": "terminate: run1"})
        );
        // Flower sends `terminate=1`.
        assert_eq!(
            run(
                &panel,
                "revoke",
                json!({"task_id": "run1", "terminate": 1, "signal": "SIGTERM"})
            )
            .await,
            json!({"ok": "terminate: run1"})
        );
        let revokes = panel.revokes.lock().unwrap().clone();
        let terminate: Vec<Option<i32>> = revokes.iter().map(|(_, t)| *t).collect();
        assert_eq!(terminate, [None, None, Some(9), Some(9), Some(2), Some(15)]);
        assert_eq!(
            run(&panel, "revoked", json!({})).await,
            json!(["abc", "a1", "a2", "zzz", "run1"])
        );
        // A bad signal changes nothing.
        assert_eq!(
            run(
                &panel,
                "revoke",
                json!({"task_id": "x", "terminate": true, "signal": "kill"})
            )
            .await,
            json!({"error": "TypeError('signal name must be uppercase string.')"})
        );
        assert_eq!(
            run(
                &panel,
                "revoke",
                json!({"task_id": "x", "terminate": true, "signal": "SIGNOPE"})
            )
            .await,
            json!({"error": "AttributeError(\"module 'signal' has no attribute 'SIGNOPE'\")"})
        );
        assert_eq!(panel.revokes.lock().unwrap().len(), 6);
        // Celery's default signal is SIGTERM.
        run(
            &panel,
            "revoke",
            json!({"task_id": "y", "terminate": "yes"}),
        )
        .await;
        assert_eq!(panel.revokes.lock().unwrap()[6].1, Some(15));
        run(&panel, "revoke", json!({"task_id": "z", "terminate": 0})).await;
        assert_eq!(panel.revokes.lock().unwrap()[7].1, None);
    }

    #[tokio::test]
    async fn task_listings() {
        let panel = fake(vec![
            task("act", TaskPhase::Active, Some(1_700_000_000.5)),
            task("res", TaskPhase::Reserved, None),
            task("sch", TaskPhase::Scheduled, None),
            task("end", TaskPhase::Ending, Some(1.0)),
        ]);
        let active = run(&panel, "active", json!({})).await;
        assert_eq!(
            active,
            json!([{
                "id": "act", "name": "offliner.youtube", "args": [],
                "kwargs": {"flags": {"id": "UC1"}}, "type": "offliner.youtube",
                "hostname": "alice@node1", "time_start": 1_700_000_000.5,
                "acknowledged": false,
                "delivery_info": {"exchange": "offliner", "routing_key": "small",
                                  "priority": null, "redelivered": false},
                "worker_pid": std::process::id(),
            }])
        );
        let safe = run(&panel, "active", json!({"safe": true})).await;
        assert_eq!(safe[0]["args"], "[]");
        assert_eq!(safe[0]["kwargs"], "{'flags': {'id': 'UC1'}}");
        let reserved = run(&panel, "reserved", json!({})).await;
        assert_eq!(reserved.as_array().map(Vec::len), Some(1));
        assert_eq!(reserved[0]["id"], "res");
        assert_eq!(reserved[0]["worker_pid"], Value::Null);
        let scheduled = run(&panel, "scheduled", json!({})).await;
        assert_eq!(scheduled[0]["eta"], "2030-01-01T00:00:00+00:00");
        assert_eq!(scheduled[0]["priority"], 6);
        assert_eq!(scheduled[0]["request"]["id"], "sch");
        assert_eq!(
            run(
                &panel,
                "query_task",
                json!({"ids": ["act", "end", "nope", "long-gone"]})
            )
            .await,
            json!({
                "act": ["active", to_value(&request_info(&panel.tasks[0], "alice@node1", std::process::id(), false))],
                "end": ["ready", to_value(&request_info(&panel.tasks[3], "alice@node1", std::process::id(), false))],
                "long-gone": ["ready", {"id": "long-gone", "hostname": "alice@node1"}],
            })
        );
        assert_eq!(
            run(&panel, "registered", json!({})).await,
            json!([
                "offliner.gutenberg",
                "offliner.mwoffliner",
                "offliner.phet",
                "offliner.youtube"
            ])
        );
    }

    #[tokio::test]
    async fn stats_has_what_flower_reads() {
        let panel = fake(Vec::new());
        let stats = run(&panel, "stats", json!({})).await;
        assert_eq!(stats["total"], json!({"offliner.mwoffliner": 2}));
        assert_eq!(stats["pid"], 42);
        assert_eq!(stats["uptime"], 62);
        assert_eq!(stats["prefetch_count"], 3);
        assert_eq!(stats["pool"]["max-concurrency"], 3);
        assert_eq!(stats["pool"]["processes"], json!([42]));
        assert_eq!(
            stats["broker"],
            json!({
                "hostname": "broker.example", "userid": "alice", "virtual_host": "zimfarm",
                "port": 5671, "insist": false, "ssl": true, "transport": "amqp",
                "connect_timeout": 15, "transport_options": {}, "login_method": "PLAIN",
                "uri_prefix": null, "heartbeat": 60.0, "failover_strategy": "round-robin",
                "alternates": [], "credential_provider": null,
            })
        );
        assert!(
            stats["rusage"]["maxrss"].as_u64().unwrap_or(0) > 0,
            "{stats}"
        );
        assert!(stats["clock"].is_string());
        let text = stats.to_string();
        assert!(!text.contains("s3cr3t"), "no password in {text}");
        let conf = run(&panel, "conf", json!({})).await;
        assert_eq!(
            conf["broker_url"],
            "amqps://alice:********@broker.example:5671/zimfarm"
        );
        assert_eq!(conf["worker_concurrency"], 3);
        assert!(!conf.to_string().contains("s3cr3t"));
    }

    #[tokio::test]
    async fn queues_come_and_go() {
        let panel = fake(Vec::new());
        let queues = run(&panel, "active_queues", json!({})).await;
        assert_eq!(queues[0]["name"], "small");
        assert_eq!(queues[0]["exchange"]["name"], "offliner");
        assert_eq!(queues[0]["exchange"]["type"], "topic");
        assert_eq!(
            run(&panel, "add_consumer", json!({"queue": "medium"})).await,
            json!({"ok": "add consumer medium"})
        );
        run(&panel, "add_consumer", json!({"queue": "extra"})).await;
        assert_eq!(
            run(
                &panel,
                "add_consumer",
                json!({"queue": "bad", "exchange_type": "weird"})
            )
            .await,
            json!({"error": "exchange_type \"weird\" is not one of direct, topic, fanout, headers"})
        );
        assert_eq!(
            panel.queues(),
            [
                TaskQueue::zimfarm("small"),
                TaskQueue::zimfarm("medium"),
                TaskQueue {
                    name: "extra".into(),
                    exchange: "extra".into(),
                    exchange_type: "direct".into(),
                    routing_key: "extra".into(),
                }
            ]
        );
        assert_eq!(
            run(&panel, "cancel_consumer", json!({"queue": "small"})).await,
            json!({"ok": "no longer consuming from small"})
        );
        assert_eq!(panel.queues().len(), 2);
        let long = "x".repeat(256);
        for args in [
            json!({"queue": long}),
            json!({"queue": "q", "exchange": long}),
            json!({"queue": "q", "routing_key": long}),
        ] {
            let reply = run(&panel, "add_consumer", args).await;
            assert!(reply["error"].as_str().unwrap().contains("255"), "{reply}");
        }
        assert_eq!(panel.queues().len(), 2);
        assert_eq!(
            run(&panel, "add_consumer", json!({})).await["error"]
                .as_str()
                .map(|e| e.starts_with("TypeError(")),
            Some(true)
        );
    }

    #[tokio::test]
    async fn events_heartbeat_hello_and_shutdown() {
        let panel = fake(Vec::new());
        assert_eq!(
            run(&panel, "enable_events", json!({})).await,
            json!({"ok": "task events already enabled"})
        );
        assert_eq!(
            run(&panel, "disable_events", json!({})).await,
            json!({"ok": "task events disabled"})
        );
        assert!(!panel.events.is_enabled());
        assert_eq!(
            run(&panel, "disable_events", json!({})).await,
            json!({"ok": "task events already disabled"})
        );
        assert_eq!(
            run(&panel, "enable_events", json!({})).await,
            json!({"ok": "task events enabled"})
        );
        assert_eq!(run(&panel, "heartbeat", json!({})).await, Value::Null);
        assert_eq!(panel.heartbeats.load(Ordering::SeqCst), 1);

        let clock = panel.events.clock().value();
        let hello = run(
            &panel,
            "hello",
            json!({"from_node": "bob@node2", "revoked": ["r1", "r2"]}),
        )
        .await;
        assert_eq!(hello["revoked"], json!(["r1", "r2"]));
        assert_eq!(hello["clock"], clock + 1);
        // Celery 5 before 5.7 sent a map of id -> timestamp.
        run(
            &panel,
            "hello",
            json!({"from_node": "bob@node2", "revoked": {"r3": 1.5}}),
        )
        .await;
        assert_eq!(panel.revoked(), ["r1", "r2", "r3"]);
        assert_eq!(
            run(&panel, "hello", json!({"from_node": "alice@node1"})).await,
            Value::Null
        );

        let (reply, after) = dispatch(&panel, "shutdown", &Map::new()).await;
        assert_eq!(reply, json!({"ok": "shutting down"}));
        assert_eq!(after, After::Shutdown);
        assert!(panel.outbox.is_empty());
    }

    #[test]
    fn revoked_set_is_bounded_and_expires() {
        let start = Instant::now();
        let mut set = RevokedSet::new(3, Duration::from_secs(10));
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            set.insert(id, start + Duration::from_secs(i as u64));
        }
        assert_eq!(set.ids(start + Duration::from_secs(4)), ["b", "c", "d"]);
        assert!(!set.contains("a", start + Duration::from_secs(4)));
        assert!(set.contains("b", start + Duration::from_secs(4)));
        // Revoked again: newest, and its time starts over.
        set.insert("b", start + Duration::from_secs(5));
        assert_eq!(set.ids(start + Duration::from_secs(5)), ["c", "d", "b"]);
        assert!(!set.contains("c", start + Duration::from_secs(12)));
        assert_eq!(set.ids(start + Duration::from_secs(14)), ["b"]);
        assert_eq!(set.len(), 1);
        assert!(set.ids(start + Duration::from_secs(15)).is_empty());
        assert!(set.is_empty());
    }

    #[test]
    fn signal_names_and_numbers() {
        assert_eq!(signum(None), Ok(15));
        assert_eq!(signum(Some(&json!("SIGKILL"))), Ok(9));
        assert_eq!(signum(Some(&json!("KILL"))), Ok(9));
        assert_eq!(signum(Some(&json!("SIGUSR1"))), Ok(10));
        assert_eq!(signum(Some(&json!(9))), Ok(9));
        assert!(signum(Some(&json!(0))).is_err());
        assert!(signum(Some(&json!("sigkill"))).is_err());
        assert!(signum(Some(&json!(["x"]))).is_err());
        // Python's aliases, which the C names do not cover.
        assert_eq!(signum(Some(&json!("SIGIOT"))), Ok(6));
        assert_eq!(signum(Some(&json!("POLL"))), Ok(29));
        assert_eq!(signum(Some(&json!("SIGCLD"))), Ok(17));
        assert_eq!(signum(Some(&json!("SIGSTKFLT"))), Ok(16));
        assert_eq!(signum(Some(&json!("SIGPWR"))), Ok(30));
        assert_eq!(
            signum(Some(&json!("SIGNOPE"))),
            Err(exception(
                "AttributeError",
                "module 'signal' has no attribute 'SIGNOPE'"
            ))
        );
        assert_eq!(python_set(&[]), "set()");
    }

    #[test]
    fn rusage_is_the_process_own() {
        let usage = rusage();
        assert!(usage.maxrss > 0);
        assert!(usage.minflt > 0);
        assert!(usage.utime + usage.stime > 0.0);
    }
}
