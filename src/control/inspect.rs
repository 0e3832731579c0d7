//! The read-only commands: `inspect active`, `reserved`, `scheduled`,
//! `query_task`, `registered`, `active_queues`, `stats`, `conf` and
//! `report`, built from what the worker tells through [`ControlledWorker`].
//!
//! Owns the replies' contents only; it changes nothing.

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
use crate::celery::iso8601;
use crate::config::Config;
use crate::offliner::Offliner;
use crate::worker::registry::{REVOKE_EXPIRES, REVOKES_MAX};

pub(super) fn request_info(
    task: &TaskSnapshot,
    hostname: &str,
    pid: u32,
    safe: bool,
) -> RequestInfo {
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
pub(super) fn query_task<W: ControlledWorker>(worker: &W, ids: &[String]) -> Value {
    let hostname = worker.events().hostname();
    let pid = std::process::id();
    let mut reply = Map::new();
    for task in worker.tasks() {
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
        if !reply.contains_key(id) && worker.ended(id) {
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
pub(super) fn registered() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Offliner::ALL.iter().map(|o| o.task_name()).collect();
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
