//! The offliners this worker knows, and the plan for running one task.
//!
//! Owns the task table of SPEC §3 (task name → image, command, output
//! directory; [`registered`] names them, with a test-only extra one in a
//! build with the `test-extra-task` feature) and turns a decoded
//! [`TaskRequest`] into a validated, allow-listed [`TaskPlan`]: the task
//! id, the image, the container's argv and the warehouse path, each
//! checked before anything uses them. It is pure: it must not call Docker,
//! touch the filesystem or decode messages.
//!
//! - [`ImageRef`], [`AllowList`]: image references (tags bounded by
//!   Docker's grammar, digests refused) and the image allow-list: a task
//!   runs its own image, or one `IMAGE_ALLOWLIST` allows for it;
//! - [`flags_to_argv`]: task flags → command-line arguments;
//! - parameter reading (named, positional and the older `offliner` form) is
//!   described in `params.rs`;
//! - [`PlanError`]: why a task can't be planned (`error.rs`).
//!
//! Decisions where the contract is silent:
//!
//! - `offliner.gutenberg` runs a fixed command and `offliner.phet` its
//!   image's own command: their flags are shape-checked (an object or
//!   null) and otherwise ignored;
//! - flags that would override what the worker sets itself are refused:
//!   `outputDirectory`, `output-directory` (yargs reads it as the same
//!   option) and `redis` for mwoffliner, `output` for youtube. The worker's
//!   own arguments come last, and argparse (youtube2zim) keeps the last
//!   value, so an abbreviation such as `--out` can't redirect the output;
//! - checks run in this order, the first failure wins: task id, task name,
//!   parameter shapes, warehouse path, image and allow-list, flags.

mod error;
mod flags;
mod image;
mod params;
#[cfg(test)]
mod tests;

use std::fmt;

pub use error::PlanError;
pub use flags::flags_to_argv;
pub use image::{AllowList, ImageRef};

use crate::celery::TaskRequest;
use error::shown;
use params::Params;

/// Longest task id, in characters.
const MAX_TASK_ID_LEN: usize = 64;

/// Where the offliner writes its files, for all but phet.
const OUTPUT_DIR: &str = "/output";

/// Where phet's build writes its files.
const PHET_OUTPUT_DIR: &str = "/phet/dist";

/// One registered task (SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offliner {
    Mwoffliner,
    Youtube,
    Gutenberg,
    Phet,
}

impl Offliner {
    pub const ALL: [Offliner; 4] = [
        Offliner::Mwoffliner,
        Offliner::Youtube,
        Offliner::Gutenberg,
        Offliner::Phet,
    ];

    /// The Celery task name, as the dispatcher sends it.
    pub fn task_name(self) -> &'static str {
        match self {
            Offliner::Mwoffliner => "offliner.mwoffliner",
            Offliner::Youtube => "offliner.youtube",
            Offliner::Gutenberg => "offliner.gutenberg",
            Offliner::Phet => "offliner.phet",
        }
    }

    /// The offliner for a task name, or `None` for a task not registered here.
    pub fn from_task_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.task_name() == name)
    }

    /// The task's own image (SPEC §3): used when the task names none, and
    /// the only one it may run unless `IMAGE_ALLOWLIST` widens that.
    pub fn default_image_name(self) -> &'static str {
        match self {
            Offliner::Mwoffliner => "openzim/mwoffliner",
            Offliner::Youtube => "openzim/youtube",
            Offliner::Gutenberg => "openzim/gutenberg",
            Offliner::Phet => "openzim/phet",
        }
    }

    /// Where the offliner writes its files inside its container.
    pub fn output_dir(self) -> &'static str {
        match self {
            Offliner::Phet => PHET_OUTPUT_DIR,
            Offliner::Mwoffliner | Offliner::Youtube | Offliner::Gutenberg => OUTPUT_DIR,
        }
    }

    /// Whether the offliner needs a per-task redis.
    pub fn needs_redis(self) -> bool {
        self == Offliner::Mwoffliner
    }

    /// Flags the worker sets itself, which a task may not give.
    fn reserved_flags(self) -> &'static [&'static str] {
        match self {
            Offliner::Mwoffliner => &["outputDirectory", "output-directory", "redis"],
            Offliner::Youtube => &["output"],
            Offliner::Gutenberg | Offliner::Phet => &[],
        }
    }
}

/// The task name only a build with the test-only cargo feature
/// `test-extra-task` knows (it runs as any task does under the simulate
/// runner; the Docker runner has no plan for it): a farm of two versions
/// in the tests, one knowing a task the other does not.
#[cfg(feature = "test-extra-task")]
pub const EXTRA_TEST_TASK: &str = "offliner.extra_test_task";

/// The task names this build runs: the offliners', and with the
/// `test-extra-task` feature [`EXTRA_TEST_TASK`].
pub fn registered() -> impl Iterator<Item = &'static str> {
    let names = Offliner::ALL.into_iter().map(Offliner::task_name);
    #[cfg(feature = "test-extra-task")]
    let names = names.chain(std::iter::once(EXTRA_TEST_TASK));
    names
}

/// Whether this build runs tasks named `name` (see [`registered`]).
pub fn is_registered(name: &str) -> bool {
    registered().any(|n| n == name)
}

impl fmt::Display for Offliner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.task_name())
    }
}

/// Everything needed to run one task, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskPlan {
    /// The task id, checked by [`validate_task_id`]: safe as a directory
    /// name and a container-name component.
    pub task_id: String,
    pub offliner: Offliner,
    /// The image to run, allowed by the allow-list.
    pub image: ImageRef,
    /// The container command in argv form; empty means the image's own
    /// default command (phet).
    pub argv: Vec<String>,
    /// Where the offliner writes its files in the container: `/output`, or
    /// `/phet/dist` for phet.
    pub output_dir: &'static str,
    /// Warehouse directory, normalised: starts with `/`, no trailing `/`,
    /// e.g. `/wikipedia`. Files go to `/zim<warehouse_path>/<name>`.
    pub warehouse_path: String,
    /// Whether the task needs a per-task redis (mwoffliner only).
    pub needs_redis: bool,
    /// Whether the offliner writes openZIM's progress file (it is given
    /// `--stats-filename`, see [`crate::progress::STATS_FILE_NAME`]).
    pub writes_progress: bool,
}

/// Checks that a task id is 1 to 64 characters of `[A-Za-z0-9_-]`: the
/// dispatcher sends 24 hex digits and Celery uuids have `-`. The id becomes
/// a directory name and a container-name component, so nothing else passes.
pub fn validate_task_id(id: &str) -> Result<(), PlanError> {
    let valid = (1..=MAX_TASK_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(PlanError::InvalidTaskId { id: shown(id) })
    }
}

/// Turns a decoded task into a validated, allow-listed plan.
///
/// `redis_url` is the worker's own address of the task's redis, passed to
/// mwoffliner as `--redis=<redis_url>` (ignored for other offliners).
pub fn plan(
    request: &TaskRequest,
    allow: &AllowList,
    redis_url: &str,
) -> Result<TaskPlan, PlanError> {
    validate_task_id(&request.id)?;
    let offliner =
        Offliner::from_task_name(&request.name).ok_or_else(|| PlanError::UnknownTask {
            name: shown(&request.name),
        })?;
    let params = Params::from_request(request)?;

    let image = ImageRef::from_parts(
        params.image.name.unwrap_or(offliner.default_image_name()),
        params.image.tag.unwrap_or("latest"),
    )?;
    if !allow.allows(offliner, &image) {
        return Err(PlanError::ImageNotAllowed {
            image: image.to_string(),
            task: offliner.task_name(),
            own: offliner.default_image_name(),
            allow_list: allow.to_string(),
        });
    }

    let argv = match offliner {
        Offliner::Mwoffliner => {
            if redis_url.is_empty() || redis_url.chars().any(char::is_control) {
                return Err(PlanError::InvalidRedisUrl {
                    url: shown(redis_url),
                });
            }
            let mut argv = vec!["mwoffliner".to_owned()];
            argv.extend(task_flags(offliner, params.flags)?);
            argv.push(format!("--outputDirectory={OUTPUT_DIR}"));
            argv.push(format!("--redis={redis_url}"));
            argv
        }
        Offliner::Youtube => {
            let mut argv = vec!["youtube2zim".to_owned()];
            argv.extend(task_flags(offliner, params.flags)?);
            argv.push(format!("--output={OUTPUT_DIR}"));
            // Last, so that it wins over any such flag of the message
            // (argparse keeps the last value, abbreviations included).
            argv.push(format!(
                "--stats-filename={OUTPUT_DIR}/{}",
                crate::progress::STATS_FILE_NAME
            ));
            argv
        }
        Offliner::Gutenberg => [
            "gutenberg2zim",
            "--complete",
            "--formats",
            "all",
            "--one-language-one-zim",
            OUTPUT_DIR,
        ]
        .into_iter()
        .map(str::to_owned)
        .collect(),
        Offliner::Phet => Vec::new(),
    };

    Ok(TaskPlan {
        task_id: request.id.clone(),
        offliner,
        image,
        argv,
        output_dir: offliner.output_dir(),
        warehouse_path: params.warehouse_path,
        needs_redis: offliner.needs_redis(),
        writes_progress: offliner == Offliner::Youtube,
    })
}

/// The task's flags as arguments, refusing those the worker sets itself.
fn task_flags(
    offliner: Offliner,
    flags: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<Vec<String>, PlanError> {
    let Some(flags) = flags else {
        return Ok(Vec::new());
    };
    if let Some(key) = flags
        .keys()
        .find(|key| offliner.reserved_flags().contains(&key.as_str()))
    {
        return Err(PlanError::ReservedFlag {
            key: shown(key),
            task: offliner.task_name(),
        });
    }
    flags_to_argv(flags)
}
