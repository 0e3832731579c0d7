//! From [`Env`] to the settings groups: which variables each group reads,
//! in which order (the first bad one is the one reported), and the checks
//! that span variables (the broker URL built from the account, the pidbox
//! queue name's length). Must not parse a value itself (the table's
//! parsers do) nor read the process environment.

use lapin::uri::{AMQPAuthority, AMQPScheme, AMQPUri, AMQPUserInfo};

use super::vars::{self, Env};
use super::{
    BrokerSettings, BrokerUrl, Config, ConfigError, DispatcherSettings, PipelineSettings,
    WarehouseSettings, WorkerSettings,
};
use crate::config::AMQP_NAME_MAX;

/// What kombu appends to the Celery hostname for a node's pidbox queue.
pub(super) const PIDBOX_SUFFIX: &str = ".celery.pidbox";

impl Env {
    /// The pipeline's settings (also read alone by `run-task`).
    pub(super) fn pipeline(&self) -> Result<PipelineSettings, ConfigError> {
        Ok(PipelineSettings {
            working_dir: self.value(&vars::WORKING_DIR)?,
            node_name: self.value(&vars::NODE_NAME)?,
            zim_dir: self.value(&vars::ZIM_DIR)?,
            pull_policy: self.value(&vars::PULL_POLICY)?,
            idle_timeout: self.value(&vars::IDLE_TIMEOUT)?,
            min_free_disk: self.value(&vars::MIN_FREE_DISK_MB)?,
            kept_dir_max_age: self.value(&vars::KEPT_DIR_MAX_AGE)?,
            container_memory: self.get(&vars::CONTAINER_MEMORY_MB)?,
            container_nano_cpus: self.get(&vars::CONTAINER_CPUS)?,
            container_log_limit: self.value(&vars::CONTAINER_LOG_MAX_MB)?,
            container_pids: self.value(&vars::CONTAINER_PIDS)?,
            redis_memory: self.value(&vars::REDIS_MEMORY_MB)?,
            scraper_network: self.get(&vars::SCRAPER_NETWORK)?,
            image_allowlist: self.get(&vars::IMAGE_ALLOWLIST)?.unwrap_or_default(),
            redis_image: self.value(&vars::REDIS_IMAGE)?,
        })
    }

    /// The dispatcher's settings (also read alone by `register-key`).
    pub(super) fn dispatcher(&self) -> Result<DispatcherSettings, ConfigError> {
        let username = self.value(&vars::USERNAME)?;
        let password = self.value(&vars::PASSWORD)?;
        let url = self.value(&vars::DISPATCHER_URL)?;
        Ok(DispatcherSettings {
            url,
            username,
            password,
        })
    }

    /// The warehouse's settings (also read alone by `run-task`).
    pub(super) fn warehouse(&self, username: String) -> Result<WarehouseSettings, ConfigError> {
        Ok(WarehouseSettings {
            host: self.value(&vars::WAREHOUSE_HOST)?,
            port: self.value(&vars::WAREHOUSE_PORT)?,
            username,
            ssh_key: self.value(&vars::SSH_KEY)?,
            known_hosts: self.value(&vars::WAREHOUSE_KNOWN_HOSTS)?,
            host_key_pins: self.get(&vars::WAREHOUSE_HOST_KEY)?.unwrap_or_default(),
            upload_retries: self.value(&vars::UPLOAD_RETRIES)?,
            upload_streams: self.value(&vars::UPLOAD_STREAMS)?,
        })
    }

    /// BROKER_URL, or the production broker at DISPATCHER_HOST:RABBIT_PORT
    /// with the account's credentials.
    fn broker(&self, dispatcher: &DispatcherSettings) -> Result<BrokerSettings, ConfigError> {
        let queues = self.value(&vars::QUEUES)?;
        let url = match self.get(&vars::BROKER_URL)? {
            Some(url) => url,
            None => BrokerUrl(AMQPUri {
                scheme: AMQPScheme::AMQPS,
                authority: AMQPAuthority {
                    userinfo: AMQPUserInfo {
                        username: dispatcher.username.clone(),
                        password: dispatcher.password.expose().to_owned(),
                    },
                    host: self.value(&vars::DISPATCHER_HOST)?,
                    port: self.value(&vars::RABBIT_PORT)?,
                },
                vhost: "zimfarm".to_owned(),
                query: Default::default(),
            }),
        };
        let ca_file = self.get(&vars::BROKER_CA_FILE)?;
        Ok(BrokerSettings {
            url,
            ca_file,
            queues,
        })
    }

    /// The whole configuration.
    pub(super) fn config(&self) -> Result<Config, ConfigError> {
        let pipeline = self.pipeline()?;
        let metrics_addr = self.get(&vars::METRICS_ADDR)?;
        let dispatcher = self.dispatcher()?;
        let warehouse = self.warehouse(dispatcher.username.clone())?;
        pidbox_fits(&dispatcher.username, &pipeline.node_name)?;
        let concurrency = match self.get(&vars::CONCURRENCY)? {
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let broker = self.broker(&dispatcher)?;
        let worker = WorkerSettings {
            concurrency,
            shutdown_grace: self.value(&vars::SHUTDOWN_GRACE)?,
            restart_grace: self.value(&vars::RESTART_GRACE)?,
            max_message_bytes: self.value(&vars::MAX_MESSAGE_BYTES)?,
            max_eta_held: self.value(&vars::MAX_ETA_HELD)?,
            log_format: self.value(&vars::LOG_FORMAT)?,
            runner: self.value(&vars::TASK_RUNNER)?,
            metrics_addr,
            control_policy: self.value(&vars::CONTROL_POLICY)?,
            progress_interval: self.value(&vars::PROGRESS_INTERVAL)?,
        };
        Ok(Config {
            dispatcher,
            broker,
            warehouse,
            pipeline,
            worker,
        })
    }
}

/// The pidbox queue `USERNAME@NODE_NAME.celery.pidbox` must fit an AMQP
/// name.
fn pidbox_fits(username: &str, node_name: &str) -> Result<(), ConfigError> {
    let pidbox_len = username.len() + 1 + node_name.len() + PIDBOX_SUFFIX.len();
    if pidbox_len > AMQP_NAME_MAX {
        return Err(ConfigError::new(
            vars::USERNAME.name(),
            format!(
                "is {} bytes long; with NODE_NAME ({} bytes) the pidbox queue \
                 USERNAME@NODE_NAME{PIDBOX_SUFFIX} would be {pidbox_len} bytes, over \
                 the {AMQP_NAME_MAX} an AMQP queue name may have; use a shorter USERNAME or NODE_NAME",
                username.len(),
                node_name.len()
            ),
        ));
    }
    Ok(())
}
