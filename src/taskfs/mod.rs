//! The box's file side: how the worker touches a task's files on disk
//! when the scraper that wrote them may be hostile (SPEC §4, "the box").
//!
//! Two places, two rules:
//!
//! - **The scraper's dir** (`ZIM_DIR/<id>`, mounted read-write into its
//!   container): everything in it may be a link, a fifo or a device put
//!   there to make the worker read or write elsewhere. The worker only
//!   reads from it, through [`DirHandle::open_file`]: relative to the dir's
//!   handle, no link followed at any step (`openat2` with
//!   `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, else
//!   `O_NOFOLLOW` at each step), a regular file only, and then sized,
//!   hashed and sent through that one descriptor ([`LocalSource`]).
//! - **The worker's own dir** of the task (`ZIM_DIR/.zimfarm/<id>`, mode
//!   0700 like `ZIM_DIR/.zimfarm`, never mounted into a container, on the
//!   same filesystem as the task dirs): the container log and its `.gz`,
//!   the task record ([`record`]: its stage, its containers, how far their
//!   output is in the log), the upload journals, and whatever else the
//!   worker keeps of a task; and, in the root itself, the node's alive
//!   file. Files there are created exclusively
//!   (`O_CREAT | O_EXCL | O_NOFOLLOW`) and replaced atomically (a fresh
//!   temporary file, then a rename) through [`OwnDir`] and [`OwnFile`].
//!
//! No task id can name the own dirs' root: task ids have no `.`
//! ([`crate::offliner::validate_task_id`]).
//!
//! Owns those two access paths and the layout of the own dirs. It must not
//! decide what a task uploads, nor sweep: the pipeline and the sweeper call
//! it.

mod beneath;
mod own;
pub mod record;

pub use beneath::{DirHandle, FileKind, LocalSource, OpenError};
pub use own::{
    OLD_LAYOUT_JOURNAL_PREFIX, OLD_LAYOUT_MARKER, OWN_ROOT, OwnDir, OwnFile, own_dir_path,
    remove_own_dir,
};
