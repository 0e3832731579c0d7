//! The read-only commands: `inspect active`, `reserved`, `scheduled`,
//! `query_task`, `registered`, `active_queues`, `stats`, `conf` and
//! `report`, built from what the worker tells through [`ControlledWorker`].
//!
//! Every request's arguments come from a message, an attacker's maybe: a
//! request's `args`/`kwargs` are echoed whole only up to
//! [`MAX_ECHOED_ARGS_BYTES`] of JSON, else (and in `safe` replies) as their
//! reprs cut at [`REPR_MAXSIZE`] characters, as Celery's `saferepr` cuts
//! `argsrepr`; `query_task` takes at most [`MAX_QUERY_IDS`] ids, task ids
//! only, and looks each up once.
//!
//! Owns the replies' contents only; it changes nothing.

use std::collections::HashSet;

use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::time::TimeVal;
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::{ControlledWorker, TaskPhase, TaskSnapshot, to_value};
use crate::broker::{
    CONNECT_TIMEOUT, CONTROL_QUEUE_EXPIRES_MS, CONTROL_QUEUE_TTL_MS, EVENT_EXCHANGE, TaskQueue,
};
use crate::celery::control::{
    BrokerInfo, PoolInfo, QueueInfo, RequestInfo, Rusage, ScheduledInfo, Stats,
};
use crate::celery::{iso8601, task_id};
use crate::config::Config;
use crate::worker::registry::{REVOKE_EXPIRES, REVOKES_MAX};

/// Most characters of an `argsrepr` or `kwargsrepr` a reply echoes:
/// Celery's `argsrepr_maxsize` and `kwargsrepr_maxsize`.
pub(super) const REPR_MAXSIZE: usize = 1024;

/// Most bytes of JSON a request's `args` and `kwargs` may take together to
/// be echoed whole (a Zimfarm task's take a few hundred); larger ones are
/// echoed as their cut reprs, the shape of Celery's `safe` replies.
pub(super) const MAX_ECHOED_ARGS_BYTES: usize = 16 * 1024;

/// Most ids one `query_task` takes: as many as one `revoke` takes.
pub(super) const MAX_QUERY_IDS: usize = super::actions::MAX_REVOKE_IDS;

/// `repr` cut at [`REPR_MAXSIZE`] characters, then `...`, as Celery's
/// `saferepr(o, maxlen)` ends a repr it cuts.
pub(super) fn cut_repr(repr: &str) -> String {
    match repr.char_indices().nth(REPR_MAXSIZE) {
        None => repr.to_owned(),
        Some((end, _)) => format!("{}...", &repr[..end]),
    }
}

/// Bytes of the JSON of `value`, counted without building it.
fn json_len(value: &impl Serialize) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    match serde_json::to_writer(&mut counter, value) {
        Ok(()) => counter.0,
        Err(_) => usize::MAX,
    }
}

/// A request as `inspect` shows it: `args`/`kwargs` whole unless `safe` or
/// larger than [`MAX_ECHOED_ARGS_BYTES`], else their reprs cut at
/// [`REPR_MAXSIZE`] characters.
pub(super) fn request_info(
    task: &TaskSnapshot,
    hostname: &str,
    pid: u32,
    safe: bool,
) -> RequestInfo {
    let request = &task.request;
    let whole = !safe
        && json_len(&request.args).saturating_add(json_len(&request.kwargs))
            <= MAX_ECHOED_ARGS_BYTES;
    let (args, kwargs) = if whole {
        (
            Value::Array(request.args.clone()),
            Value::Object(request.kwargs.clone()),
        )
    } else {
        (
            Value::String(cut_repr(&request.argsrepr)),
            Value::String(cut_repr(&request.kwargsrepr)),
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
        progress: task.progress.clone(),
    }
}

/// `inspect active` / `inspect reserved`: the tasks in `phase`, oldest
/// start first.
pub(super) fn requests<W: ControlledWorker>(
    worker: &W,
    phase: TaskPhase,
    safe: bool,
) -> Vec<RequestInfo> {
    let hostname = worker.events().hostname();
    let pid = std::process::id();
    let mut tasks: Vec<TaskSnapshot> = worker
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
pub(super) fn scheduled<W: ControlledWorker>(worker: &W) -> Vec<ScheduledInfo> {
    let hostname = worker.events().hostname();
    let pid = std::process::id();
    let mut tasks: Vec<TaskSnapshot> = worker
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
///
/// Only task ids are taken (no other id names a task, see
/// [`task_id::check`]), at most [`MAX_QUERY_IDS`] of them; the others are
/// counted in a log line, as Celery's reply has no place for them.
pub(super) fn query_task<W: ControlledWorker>(worker: &W, ids: &[String]) -> Value {
    let hostname = worker.events().hostname();
    let pid = std::process::id();
    let mut wanted: HashSet<&str> = HashSet::new();
    let mut ignored = 0usize;
    for id in ids {
        if wanted.len() < MAX_QUERY_IDS && task_id::check(id).is_ok() {
            wanted.insert(id);
        } else if !wanted.contains(id.as_str()) {
            ignored += 1;
        }
    }
    if ignored > 0 {
        tracing::warn!(
            ignored,
            "query_task: ignored ids that are not task ids (1 to {} of A-Z a-z 0-9 _ -) or \
             beyond {MAX_QUERY_IDS} in one request",
            task_id::MAX_TASK_ID_LEN,
        );
    }
    let mut reply = Map::new();
    for task in worker.tasks() {
        if !wanted.contains(task.request.id.as_str()) {
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
    for id in wanted {
        if !reply.contains_key(id) && worker.ended(id) {
            reply.insert(
                id.to_owned(),
                json!(["ready", {"id": id, "hostname": hostname}]),
            );
        }
    }
    Value::Object(reply)
}

/// The registered task names, sorted (Celery lists its own built-ins only
/// on request).
pub(super) fn registered() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = crate::offliner::registered().collect();
    names.sort_unstable();
    names
}

pub(super) fn queue_infos(queues: &[TaskQueue]) -> Vec<QueueInfo> {
    queues
        .iter()
        .map(|q| QueueInfo::durable(&q.name, &q.exchange, &q.exchange_type, &q.routing_key))
        .collect()
}

/// `inspect stats`.
pub(super) fn stats<W: ControlledWorker>(worker: &W) -> Stats {
    let facts = worker.facts();
    let config = worker.config();
    Stats {
        total: facts.total,
        pid: facts.pid,
        clock: worker.events().clock().value().to_string(),
        uptime: facts.uptime.as_secs_f64().round() as u64,
        pool: PoolInfo {
            implementation: "zimfarm_worker:TokioTaskPool".to_owned(),
            max_concurrency: config.worker.concurrency,
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
pub(super) fn broker_info(config: &Config, heartbeat: Option<u16>) -> BrokerInfo {
    let uri = config.broker.url.uri();
    BrokerInfo {
        hostname: uri.authority.host.clone(),
        userid: uri.authority.userinfo.username.clone(),
        virtual_host: uri.vhost.clone(),
        port: uri.authority.port,
        insist: false,
        ssl: config.broker.url.is_tls(),
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
pub(super) struct Conf {
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

pub(super) fn conf<W: ControlledWorker>(worker: &W) -> Conf {
    let config = worker.config();
    let uri = config.broker.url.uri();
    let scheme = if config.broker.url.is_tls() {
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
        task_queues: queue_infos(&worker.queues()),
        worker_concurrency: config.worker.concurrency,
        worker_prefetch_multiplier: 1,
        worker_send_task_events: worker.events().is_enabled(),
        event_exchange: EVENT_EXCHANGE,
        control_exchange: "celery",
        control_queue_ttl: f64::from(CONTROL_QUEUE_TTL_MS) / 1000.0,
        control_queue_expires: f64::from(CONTROL_QUEUE_EXPIRES_MS) / 1000.0,
        worker_revokes_max: REVOKES_MAX,
        worker_revoke_expires: REVOKE_EXPIRES.as_secs(),
        shutdown_grace: config.worker.shutdown_grace.as_secs_f64(),
        max_message_bytes: config.worker.max_message_bytes,
    }
}

pub(super) fn report<W: ControlledWorker>(worker: &W) -> String {
    let identity = worker.events().identity();
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
pub(super) fn rusage() -> Rusage {
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
