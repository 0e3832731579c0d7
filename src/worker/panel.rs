//! The worker as remote control sees it: [`Panel`] for [`Worker`] (the task
//! listings, revoke, the queues consumed, shutdown) and the revoked ids.
//!
//! Owns the answers to remote control; the commands themselves are
//! [`crate::control`]'s.

use super::*;

impl<R: Runner> Inner<R> {
    pub(super) fn is_revoked(&self, id: &str) -> bool {
        self.revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id, Instant::now())
    }

    /// See [`Panel::revoke`].
    pub(super) fn revoke(&self, ids: &[String], terminate: Option<i32>) -> Vec<String> {
        {
            let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            for id in ids {
                revoked.insert(id, now);
            }
        }
        let mut found = Vec::new();
        let mut state = self.lock();
        for id in ids {
            let Some(entry) = state.tasks.get_mut(id) else {
                continue;
            };
            if entry.phase == Phase::Ending || entry.reason.is_some() {
                continue;
            }
            let reason = match (entry.phase, terminate) {
                (Phase::Running, Some(signum)) => CancelReason::Revoked {
                    terminated: true,
                    signum: Some(signum),
                },
                // As Celery: without `terminate`, a running task goes on.
                (Phase::Running, None) => continue,
                _ => CancelReason::Revoked {
                    terminated: false,
                    signum: None,
                },
            };
            tracing::warn!(task_id = %id, phase = ?entry.phase, ?terminate, "revoking the task");
            entry.reason = Some(reason);
            entry.cancel.cancel();
            found.push(id.clone());
        }
        found
    }
}

impl<R: Runner> Worker<R> {
    /// Stops a task held or running here: its runner is cancelled and the
    /// task ends with `task-revoked` (`terminated: true` with `signum` if
    /// it was running). Its id is remembered as revoked. Returns whether
    /// the task was here.
    pub fn revoke(&self, task_id: &str, signum: Option<i32>) -> bool {
        !self
            .inner
            .revoke(&[task_id.to_owned()], Some(signum.unwrap_or(15)))
            .is_empty()
    }

    /// The tasks running now.
    pub fn active(&self) -> Vec<Arc<TaskRequest>> {
        self.inner
            .lock()
            .tasks
            .values()
            .filter(|t| t.phase == Phase::Running)
            .map(|t| t.request.clone())
            .collect()
    }
}

impl<R: Runner> Panel for Worker<R> {
    fn config(&self) -> &Config {
        &self.inner.config
    }

    fn events(&self) -> &EventSink {
        &self.inner.events
    }

    fn facts(&self) -> WorkerFacts {
        let heartbeat = self
            .inner
            .topology()
            .live
            .as_ref()
            .map(|live| live.connection.configuration().heartbeat());
        WorkerFacts {
            pid: std::process::id(),
            uptime: self.inner.started_at.elapsed(),
            prefetch_count: self.inner.prefetch.in_force(),
            total: self
                .inner
                .totals
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            heartbeat,
        }
    }

    fn ended(&self, id: &str) -> bool {
        self.inner.ended.get(id).is_some()
    }

    fn tasks(&self) -> Vec<TaskSnapshot> {
        self.inner
            .lock()
            .tasks
            .values()
            .map(|entry| TaskSnapshot {
                request: entry.request.clone(),
                phase: match entry.phase {
                    Phase::Scheduled => TaskPhase::Scheduled,
                    Phase::Reserved => TaskPhase::Reserved,
                    Phase::Running => TaskPhase::Active,
                    Phase::Ending => TaskPhase::Ending,
                },
                time_start: entry.started,
                delivery: entry.delivery.clone(),
            })
            .collect()
    }

    fn revoke(&self, ids: &[String], terminate: Option<i32>) -> Vec<String> {
        self.inner.revoke(ids, terminate)
    }

    fn revoked(&self) -> Vec<String> {
        self.inner
            .revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ids(Instant::now())
    }

    fn merge_revoked(&self, ids: &[String]) {
        let mut revoked = self.inner.revoked.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        for id in ids {
            revoked.insert(id, now);
        }
    }

    fn queues(&self) -> Vec<TaskQueue> {
        self.inner.topology().queues.clone()
    }

    async fn add_queue(&self, queue: TaskQueue) -> Result<bool, BrokerError> {
        let live = {
            let mut topology = self.inner.topology();
            if topology.queues.iter().any(|q| q.name == queue.name) {
                return Ok(false);
            }
            // Listed first: a session that starts meanwhile consumes it.
            topology.queues.push(queue.clone());
            topology.live.clone()
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
            self.inner
                .broker
                .consume_queue(&live.consume_channel, &queue.name)
                .await
        };
        match consumed.await {
            Ok(consumer) => {
                // A session that ended meanwhile took its consumers along;
                // the next one consumes every listed queue.
                let _ = live.consumers.send(consumer);
                Ok(true)
            }
            Err(error) => {
                self.inner
                    .topology()
                    .queues
                    .retain(|q| q.name != queue.name);
                Err(error)
            }
        }
    }

    async fn cancel_queue(&self, name: &str) -> Result<bool, BrokerError> {
        let live = {
            let mut topology = self.inner.topology();
            let before = topology.queues.len();
            topology.queues.retain(|q| q.name != name);
            if topology.queues.len() == before {
                return Ok(false);
            }
            topology.live.clone()
        };
        if let Some(live) = live {
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
        self.inner.stop.cancel();
    }

    fn node_in_use(&self) {
        self.inner.set_fatal(WorkerError::NodeInUse {
            node: self.inner.config.hostname(),
        });
        self.inner.stop.cancel();
    }
}
