//! The worker as remote control sees it: [`ControlledWorker`] for
//! [`Worker`] (the task listings, revoke, the queues consumed, shutdown),
//! and the same revoke and listing for the worker's own callers.
//!
//! Owns the answers to remote control, read from the registry and the
//! topology; the commands themselves are [`crate::control`]'s.

use super::*;

impl<R: Runner> Worker<R> {
    /// Stops a task held or running here: its runner is cancelled and the
    /// task ends with `task-revoked` (`terminated: true` with `signum` if
    /// it was running). Its id is remembered as revoked. Returns whether
    /// the task was here.
    pub fn revoke(&self, task_id: &str, signum: Option<i32>) -> bool {
        !self
            .inner
            .registry
            .revoke(&[task_id.to_owned()], Some(signum.unwrap_or(15)))
            .is_empty()
    }

    /// The tasks running now.
    pub fn active(&self) -> Vec<Arc<TaskRequest>> {
        (self.inner.registry.snapshot().into_iter())
            .filter(|t| t.phase == TaskPhase::Active)
            .map(|t| t.request)
            .collect()
    }
}

impl<R: Runner> ControlledWorker for Worker<R> {
    fn config(&self) -> &Config {
        &self.inner.config
    }

    fn events(&self) -> &EventSink {
        &self.inner.events
    }

    fn facts(&self) -> WorkerFacts {
        let heartbeat =
            (self.inner.topology.live()).map(|live| live.connection.configuration().heartbeat());
        WorkerFacts {
            pid: std::process::id(),
            uptime: self.inner.started_at.elapsed(),
            prefetch_count: self.inner.prefetch.in_force(),
            total: self.inner.registry.totals(),
            heartbeat,
        }
    }

    fn ended(&self, id: &str) -> bool {
        self.inner.ended.get(id).is_some()
    }

    fn tasks(&self) -> Vec<TaskSnapshot> {
        self.inner.registry.snapshot()
    }

    fn revoke(&self, ids: &[String], terminate: Option<i32>) -> Vec<String> {
        self.inner.registry.revoke(ids, terminate)
    }

    fn revoked(&self) -> Vec<String> {
        self.inner.registry.revoked()
    }

    fn merge_revoked(&self, ids: &[String]) {
        self.inner.registry.merge_revoked(ids);
    }

    fn queues(&self) -> Vec<TaskQueue> {
        self.inner.topology.queues()
    }

    async fn add_queue(&self, queue: TaskQueue) -> Result<bool, BrokerError> {
        // In turn with the pausing of a full node: a queue added while it
        // is paused is declared now and consumed on resume.
        let _turn = self.inner.topology.turn().await;
        let Some(live) = self.inner.topology.add(&queue) else {
            return Ok(false);
        };
        let Some(live) = live else {
            return Ok(true);
        };
        let consumed = async {
            // Declared on a channel of its own: a refusal must not close
            // the channel consuming the tasks.
            self.inner
                .broker
                .declare_queue_apart(&live.connection, &queue)
                .await?;
            if !live.consuming {
                return Ok(None);
            }
            self.inner
                .broker
                .consume_queue(&live.consume_channel, &queue.name)
                .await
                .map(Some)
        };
        match consumed.await {
            Ok(consumer) => {
                // A session that ended meanwhile took its consumers along;
                // the next one consumes every listed queue.
                if let Some(consumer) = consumer {
                    let made_in = self.inner.topology.generation();
                    let _ = live.consumers.send((consumer, made_in));
                }
                Ok(true)
            }
            Err(error) => {
                self.inner.topology.remove(&queue.name);
                Err(error)
            }
        }
    }

    async fn cancel_queue(&self, name: &str) -> Result<bool, BrokerError> {
        let _turn = self.inner.topology.turn().await;
        let Some(live) = self.inner.topology.remove(name) else {
            return Ok(false);
        };
        // A paused session has no consumer to cancel.
        if let Some(live) = live.filter(|live| live.consuming) {
            self.inner
                .broker
                .cancel_queue(&live.consume_channel, name)
                .await?;
        }
        Ok(true)
    }

    fn heartbeat(&self) {
        self.inner
            .events
            .emit(&EventKind::WorkerHeartbeat(self.inner.stats()));
    }

    fn shutdown(&self) {
        self.inner.stop.stop_for_good();
    }

    fn node_in_use(&self) {
        self.inner.node_taken.store(true, Ordering::SeqCst);
        self.inner.stop.stop_for_good();
    }
}
