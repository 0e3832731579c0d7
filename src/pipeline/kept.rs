//! What an earlier run of this node left: the tasks whose record (in
//! `ZIM_DIR/.zimfarm/<id>/task.json`) and containers (found by their
//! labels) let a new run carry them on, and those that cannot be, each with
//! why. `find_kept` only looks; `claim_node` removes what is
//! not kept (`remove_unkept`), `forsake` one kept task
//! (`remove_kept`); `check` lists them ([`survey`]).
//!
//! The evidence a task is still there: its offliner container (running or
//! exited) at stage generate, its task dir at stage upload; nothing at
//! stage prepare (prepare starts again). Containers labelled for another
//! NODE_NAME are never touched here.
//!
//! Owns the judgement of what is kept; it must not follow or start
//! anything (the run does, from the record).

use std::collections::BTreeMap;
use std::path::Path;

use super::{DockerRunner, SOCKETS_DIR, remove_own};
use crate::docker::{DockerClient, DockerError, LABEL_NODE, LABEL_TASK, Listed};
use crate::metrics;
use crate::runner::{KeptTask, KeptTasks};
use crate::taskfs::record::{RECORD_FILE, Stage, TaskRecord, V0_MARKER, read_alive};

/// One task an earlier run of this node left, as found.
#[derive(Debug)]
pub struct Found {
    pub task_id: String,
    /// Its record; the error's text when it cannot be read.
    pub record: Result<Option<TaskRecord>, String>,
    /// Its containers labelled for this node.
    pub containers: Vec<Listed>,
    /// Whether its task dir (`ZIM_DIR/<id>`) is there.
    pub task_dir: bool,
}

/// What becomes of a task found.
#[derive(Debug)]
pub enum Judged {
    /// It can be carried on.
    Kept(KeptTask),
    /// It cannot: its containers go, and its dirs when `dirs` (a scrape
    /// was under way in them).
    Removed {
        reason: &'static str,
        why: String,
        dirs: bool,
    },
    /// Nothing of it is to be carried on nor removed here (a kept task
    /// dir of a task that ended, left to the sweeper).
    Ignored,
}

impl Found {
    /// What becomes of it, for node `node`.
    pub fn judge(&self, node: &str) -> Judged {
        let containers = !self.containers.is_empty();
        let removed = |reason, why: String, dirs| Judged::Removed { reason, why, dirs };
        let record = match &self.record {
            Err(error) => {
                return if containers {
                    removed(
                        "unreadable",
                        format!("its record is unreadable: {error}"),
                        true,
                    )
                } else {
                    Judged::Ignored
                };
            }
            Ok(None) if containers => {
                return removed(
                    "no_record",
                    "it has no task record (a worker before records, or one that died \
                     before writing it)"
                        .to_owned(),
                    false,
                );
            }
            Ok(None) => return Judged::Ignored,
            Ok(Some(record)) => record,
        };
        if record.node.as_deref().is_some_and(|n| n != node) {
            return Judged::Ignored;
        }
        let scraping = matches!(record.stage, Stage::Prepare | Stage::Generate(_));
        let (Some(carry), Some(started)) = (&record.carry, &record.started) else {
            return if containers || scraping {
                removed(
                    "no_record",
                    "its record has nothing a worker needs to carry it on (written by \
                     run-task, or by a worker before records)"
                        .to_owned(),
                    scraping,
                )
            } else {
                Judged::Ignored
            };
        };
        match &record.stage {
            Stage::Generate(g) if !self.containers.iter().any(|c| c.name == g.offliner) => {
                return removed(
                    "not_followable",
                    format!("its offliner container {} is gone", g.offliner),
                    true,
                );
            }
            Stage::Upload(_) if !self.task_dir => {
                return removed(
                    "not_followable",
                    "its task dir, with the files to upload, is gone".to_owned(),
                    true,
                );
            }
            _ => {}
        }
        Judged::Kept(KeptTask {
            task_id: self.task_id.clone(),
            carry: carry.clone(),
            started_at: started.wall,
            age: started.elapsed(),
            stage: record.stage.label(),
            offliner: record.image.clone(),
        })
    }
}

/// The tasks an earlier run of node `node` left in `zim_dir` and the
/// engine: every own dir holding a record, and every task with a container
/// labelled for the node.
pub async fn survey(
    docker: &DockerClient,
    zim_dir: &Path,
    node: &str,
) -> Result<Vec<Found>, DockerError> {
    let listed = docker.listed(&[(LABEL_NODE, node)]).await?;
    let dir = zim_dir.to_owned();
    let mut found: BTreeMap<String, Found> = tokio::task::spawn_blocking(move || records(&dir))
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|f| (f.task_id.clone(), f))
        .collect();
    let unrecorded: Vec<String> = listed
        .iter()
        .filter_map(|c| c.labels.get(LABEL_TASK))
        .filter(|id| !found.contains_key(*id))
        .cloned()
        .collect();
    let dir = zim_dir.to_owned();
    // A task with containers and no record file: read it anyway (it may
    // have come meanwhile), through the same code.
    let late = tokio::task::spawn_blocking(move || {
        unrecorded
            .into_iter()
            .map(|id| {
                let valid = crate::offliner::validate_task_id(&id).is_ok();
                Found {
                    record: if valid {
                        TaskRecord::load_from(&dir, &id).map_err(|e| e.to_string())
                    } else {
                        Ok(None)
                    },
                    task_dir: valid && dir.join(&id).is_dir(),
                    task_id: id,
                    containers: Vec::new(),
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for f in late {
        found.entry(f.task_id.clone()).or_insert(f);
    }
    for container in listed {
        let task_id = container
            .labels
            .get(LABEL_TASK)
            .cloned()
            .unwrap_or_default();
        found
            .entry(task_id.clone())
            .or_insert_with(|| Found {
                task_id,
                record: Ok(None),
                containers: Vec::new(),
                task_dir: false,
            })
            .containers
            .push(container);
    }
    Ok(found.into_values().collect())
}

/// The tasks with a record in `ZIM_DIR/.zimfarm`. Blocking.
fn records(zim_dir: &Path) -> Vec<Found> {
    let root = zim_dir.join(crate::taskfs::OWN_ROOT);
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Ok(task_id) = entry.file_name().into_string() else {
            continue;
        };
        if crate::offliner::validate_task_id(&task_id).is_err()
            || !entry.file_type().is_ok_and(|t| t.is_dir())
        {
            continue;
        }
        let has_record = [RECORD_FILE, V0_MARKER]
            .iter()
            .any(|name| std::fs::symlink_metadata(entry.path().join(name)).is_ok());
        if !has_record {
            continue;
        }
        out.push(Found {
            record: TaskRecord::load_from(zim_dir, &task_id).map_err(|e| e.to_string()),
            task_dir: zim_dir.join(&task_id).is_dir(),
            task_id,
            containers: Vec::new(),
        });
    }
    out
}

impl DockerRunner {
    /// [`crate::runner::Runner::kept`]: read only.
    pub(super) async fn find_kept(&self) -> KeptTasks {
        let zim_dir = self.settings.zim_dir.clone();
        let away = tokio::task::spawn_blocking(move || read_alive(&zim_dir))
            .await
            .ok()
            .flatten()
            .map(|alive| alive.elapsed());
        let found = match survey(
            &self.docker,
            &self.settings.zim_dir,
            &self.settings.node_name,
        )
        .await
        {
            Ok(found) => found,
            Err(error) => {
                metrics::global().docker_error();
                tracing::error!(%error, "cannot list the containers an earlier run of this node left; carrying none on");
                return KeptTasks {
                    tasks: Vec::new(),
                    away,
                };
            }
        };
        let tasks = found
            .iter()
            .filter_map(|f| match f.judge(&self.settings.node_name) {
                Judged::Kept(task) => Some(task),
                _ => None,
            })
            .collect();
        KeptTasks { tasks, away }
    }

    /// Removes what an earlier run of this node left and the worker does
    /// not carry on (not in `keep`): the containers, and the dirs of a
    /// scrape that was under way; one line each, with why.
    pub(super) async fn remove_unkept(&self, keep: &[String]) {
        let node = &self.settings.node_name;
        let found = match survey(&self.docker, &self.settings.zim_dir, node).await {
            Ok(found) => found,
            Err(error) => {
                metrics::global().docker_error();
                tracing::error!(%error, "could not list the containers left by an earlier run of this node");
                return;
            }
        };
        for f in found {
            if keep.contains(&f.task_id) {
                continue;
            }
            let (reason, why, dirs) = match f.judge(node) {
                Judged::Ignored => continue,
                Judged::Removed { reason, why, dirs } => (reason, why, dirs),
                Judged::Kept(_) => (
                    "not_kept",
                    "the worker does not carry it on".to_owned(),
                    true,
                ),
            };
            for container in &f.containers {
                if let Err(error) = self.docker.kill_and_remove(&container.name).await {
                    metrics::global().docker_error();
                    tracing::error!(%error, container = %container.name, "could not remove a container left by an earlier run of this node");
                }
            }
            if dirs {
                self.remove_dirs(&f.task_id).await;
            }
            metrics::global().kept_task_removed(reason);
            let what = if f.containers.is_empty() {
                "removed the dirs of a scrape left by an earlier run of this node"
            } else {
                "removed containers left by an earlier run of this node"
            };
            tracing::warn!(
                task_id = %f.task_id,
                containers = f.containers.len(),
                dirs_removed = dirs,
                reason,
                "{what}, instead of carrying their task on: {why}"
            );
        }
    }

    /// [`crate::runner::Runner::forsake`]: the task's containers, dirs and
    /// record.
    pub(super) async fn remove_kept(&self, task_id: &str) {
        if crate::offliner::validate_task_id(task_id).is_err() {
            return;
        }
        let removed = self
            .docker
            .remove_labelled(&[
                (LABEL_NODE, &self.settings.node_name),
                (LABEL_TASK, task_id),
            ])
            .await;
        if let Err(error) = &removed {
            metrics::global().docker_error();
            tracing::error!(%error, %task_id, "could not remove the containers of a kept task");
        }
        self.remove_dirs(task_id).await;
        tracing::warn!(
            %task_id,
            containers = removed.unwrap_or(0),
            "removed a kept task: this node was away longer than RESTART_GRACE and its message \
             did not come back here, so it may have run elsewhere"
        );
    }

    /// The task dir, the worker's own dir of the task and its sockets dir.
    async fn remove_dirs(&self, task_id: &str) {
        let zim_dir = &self.settings.zim_dir;
        for dir in [
            zim_dir.join(task_id),
            zim_dir.join(SOCKETS_DIR).join(task_id),
        ] {
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "could not remove a kept task's dir; remove it by hand")
                }
            }
        }
        remove_own(zim_dir, task_id).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::taskfs::record::{Clock, Generating, Uploading};

    fn record(stage: Stage) -> TaskRecord {
        TaskRecord {
            version: 1,
            node: Some("n1".to_owned()),
            task_id: "t1".to_owned(),
            carry: Some(serde_json::json!({"x": 1})),
            started: Some(Clock::now()),
            image: "openzim/x:1".to_owned(),
            stage,
        }
    }

    fn container(name: &str) -> Listed {
        Listed {
            name: name.to_owned(),
            running: true,
            labels: Default::default(),
        }
    }

    fn found(record: Result<Option<TaskRecord>, String>, containers: &[&str]) -> Found {
        Found {
            task_id: "t1".to_owned(),
            record,
            containers: containers.iter().map(|n| container(n)).collect(),
            task_dir: false,
        }
    }

    fn verdict(f: &Found) -> (Option<&'static str>, &'static str) {
        match f.judge("n1") {
            Judged::Kept(k) => (Some(k.stage), "kept"),
            Judged::Removed { reason, .. } => (None, reason),
            Judged::Ignored => (None, "ignored"),
        }
    }

    #[test]
    fn a_task_is_kept_only_with_its_record_carry_and_evidence() {
        let generating = Stage::Generate(Generating {
            offliner: "off".to_owned(),
            helpers: vec!["redis".to_owned()],
            cursor: Default::default(),
        });
        let uploading = Stage::Upload(Uploading {
            files: Vec::new(),
            log: None,
        });
        let gen_rec = || Ok(Some(record(generating.clone())));
        assert_eq!(
            verdict(&found(gen_rec(), &["redis", "off"])),
            (Some("generate"), "kept")
        );
        assert_eq!(
            verdict(&found(gen_rec(), &["redis"])),
            (None, "not_followable")
        );
        assert_eq!(
            verdict(&found(Ok(Some(record(Stage::Prepare))), &[])),
            (Some("prepare"), "kept")
        );
        let up = || Ok(Some(record(uploading.clone())));
        assert_eq!(verdict(&found(up(), &[])), (None, "not_followable"));
        let with_dir = Found {
            task_dir: true,
            ..found(up(), &[])
        };
        assert_eq!(verdict(&with_dir), (Some("upload"), "kept"));
        // No record, an unreadable one, one without a carry.
        assert_eq!(verdict(&found(Ok(None), &["off"])), (None, "no_record"));
        assert_eq!(verdict(&found(Ok(None), &[])), (None, "ignored"));
        assert_eq!(
            verdict(&found(Err("bad".to_owned()), &["off"])),
            (None, "unreadable")
        );
        let mut no_carry = record(generating.clone());
        no_carry.carry = None;
        assert_eq!(
            verdict(&found(Ok(Some(no_carry)), &["off"])),
            (None, "no_record")
        );
        // A v0 marker's task, with nothing running: the sweeper's.
        let mut v0 = record(uploading);
        (v0.carry, v0.node, v0.started) = (None, None, None);
        assert_eq!(verdict(&found(Ok(Some(v0)), &[])), (None, "ignored"));
        // Another node's record is not this node's to judge.
        let mut other = record(generating);
        other.node = Some("n2".to_owned());
        assert_eq!(verdict(&found(Ok(Some(other)), &[])), (None, "ignored"));
    }
}
