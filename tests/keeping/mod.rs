//! Support for the tests of adoption (not a test target of its own): a
//! runner that reports the tasks an earlier run "left" and carries them
//! on as simulations, and an in-process worker that runs it.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use zimfarm_worker::runner::{
    KeptTask, KeptTasks, RunError, Runner, SimulatePlanner, SimulateRunner, Simulation,
    TaskContext, TaskFile,
};

use super::common::{Services, WorkerEnv};

/// What the worker asked of a [`Keeping`] runner.
#[derive(Debug, Default)]
pub struct Seen {
    pub claimed: Option<Vec<String>>,
    /// Task id, carry, started_at.
    pub runs: Vec<(String, Option<Value>, f64)>,
    pub forsaken: Vec<String>,
    pub alive: usize,
}

/// A runner that reports the tasks an earlier run "left" (as the Docker
/// runner does from its records) and carries each on by running the
/// simulation of its carried request, recording what the worker asked of
/// it: the node claimed (and what it kept), each run's carry and start,
/// the tasks forsaken.
#[derive(Clone, Default)]
pub struct Keeping {
    pub tasks: Vec<KeptTask>,
    pub away: Option<Duration>,
    pub seen: Arc<Mutex<Seen>>,
}

impl Runner for Keeping {
    type Planner = SimulatePlanner;

    fn planner(&self) -> &SimulatePlanner {
        &SimulatePlanner
    }

    fn run(
        &self,
        sim: Simulation,
        ctx: TaskContext,
    ) -> impl Future<Output = Result<Vec<TaskFile>, RunError>> + Send + 'static {
        self.seen.lock().unwrap().runs.push((
            ctx.task_id.clone(),
            ctx.carry.as_deref().cloned(),
            ctx.started_at,
        ));
        SimulateRunner.run(sim, ctx)
    }

    async fn claim_node(&self, keep: &[String]) {
        let mut keep = keep.to_vec();
        keep.sort();
        self.seen.lock().unwrap().claimed = Some(keep);
    }

    async fn kept(&self) -> KeptTasks {
        KeptTasks {
            tasks: self.tasks.clone(),
            away: self.away,
        }
    }

    fn keeps_on_leave(&self) -> bool {
        true
    }

    fn forsake(&self, task_id: &str) -> impl Future<Output = ()> + Send + 'static {
        self.seen.lock().unwrap().forsaken.push(task_id.to_owned());
        std::future::ready(())
    }

    async fn alive(&self) {
        self.seen.lock().unwrap().alive += 1;
    }
}

/// A kept task `id` of the simulate runner: runs `simulate` (its kwarg),
/// started `age` ago, with the worker's carry of a message routed to
/// `small`, with `hard` as its hard time limit.
pub fn kept_task(id: &str, simulate: Value, age: f64, hard: Option<f64>) -> KeptTask {
    use zimfarm_worker::celery::TaskRequest;
    use zimfarm_worker::celery::control::DeliveryInfo;
    let serde_json::Value::Object(kwargs) = serde_json::json!({
        "flags": {"mwUrl": "https://en.wikipedia.org", "adminEmail": "a@b.c"},
        "image": {"name": "openzim/mwoffliner", "tag": "1.9"},
        "warehouse_path": "/wikipedia",
        "simulate": simulate,
    }) else {
        unreachable!("kwargs are an object")
    };
    let mut request = TaskRequest::new(
        id.to_owned(),
        "offliner.mwoffliner".to_owned(),
        vec![],
        kwargs,
    );
    request.time_limit.hard = hard;
    request.root_id = Some(id.to_owned());
    let delivery = DeliveryInfo {
        exchange: "offliner".to_owned(),
        routing_key: "small".to_owned(),
        priority: None,
        redelivered: false,
    };
    KeptTask {
        task_id: id.to_owned(),
        carry: zimfarm_worker::worker::carry::carry(&request, &delivery),
        started_at: zimfarm_worker::celery::now_timestamp() - age,
        age: Duration::from_secs_f64(age),
        stage: "generate",
        offliner: "openzim/mwoffliner:1.9".to_owned(),
    }
}

/// A worker in this process with `runner`, on its own thread and runtime,
/// until `shutdown` fires; joined for its result.
pub fn in_process(
    sv: &Services,
    node: &str,
    env: &WorkerEnv,
    runner: Keeping,
    shutdown: zimfarm_worker::worker::Shutdown,
) -> std::thread::JoinHandle<Result<(), String>> {
    let vars = env
        .vars(&sv.vh, sv.dir.path(), node)
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()));
    let config = zimfarm_worker::config::Config::from_vars(vars).expect("a valid config");
    let dir = sv.dir.path().to_owned();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async move {
            let ended = zimfarm_worker::ended::EndedLog::open(&dir)
                .await
                .map_err(|e| e.to_string())?;
            zimfarm_worker::worker::Worker::new(config, runner, ended)
                .map_err(|e| e.to_string())?
                .run(shutdown)
                .await
                .map_err(|e| e.to_string())
        })
    })
}
