//! What a task's containers may do besides their task dir: the
//! capabilities given back after Docker drops them all, the pids limits,
//! the user the redis helper runs as, and the modes that let a container
//! without `DAC_OVERRIDE` write into dirs the worker made.
//!
//! Owns those settings and the two dirs' modes; it must not create or
//! remove dirs nor start containers (the runner does).

use std::path::Path;

/// Capabilities an offliner gets back (Docker's default set has 14; the
/// rest, `NET_RAW` (ARP and DNS spoofing on the bridge, raw probes),
/// `MKNOD`, `DAC_OVERRIDE`, `FOWNER`, `FSETID`, `SETFCAP`, `SETPCAP`,
/// `NET_BIND_SERVICE`, `SYS_CHROOT`, `KILL` and `AUDIT_WRITE`, no openZIM
/// scraper uses):
///
/// - `CHOWN`, `SETUID`, `SETGID`: an image's entrypoint may run the scraper
///   as the user that owns its output dir, as zimit's browsertrix-crawler
///   does (`docker-entrypoint.sh`: when `/crawls` is not root's it runs
///   `useradd -m` with that uid, which chowns the new home, then `gosu`):
///   that is how its files end up owned by a worker that is not root.
///   With `no-new-privileges` these only let root give up its identity.
pub const OFFLINER_CAPS: &[&str] = &["CHOWN", "SETUID", "SETGID"];

/// The redis helper runs as this user (nobody) with no capability at all:
/// it only listens on a unix socket in the sockets dir (mode
/// [`SHARED_DIR_MODE`]) and keeps nothing on disk. As a non-root user, the
/// official image's entrypoint runs redis-server directly instead of
/// switching users with `gosu` (which would need `SETUID`/`SETGID`).
pub const REDIS_USER: &str = "65534:65534";

/// Most processes and threads of the redis helper (redis-server has about
/// ten threads).
pub const REDIS_PIDS: i64 = 128;

/// Mode of a dir a container of another uid writes into: anyone may create
/// files, only their owner (or the dir's) may remove or rename them (the
/// sticky bit): a container's root without `FOWNER` cannot touch the
/// worker's files there.
pub const SHARED_DIR_MODE: u32 = 0o1777;

/// Opens a dir the worker made to a container whose root has no
/// `DAC_OVERRIDE`: the sockets dir always (the redis helper runs as
/// [`REDIS_USER`]).
pub async fn share_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(SHARED_DIR_MODE)).await
}

/// The task dir, when it is not root's (the worker runs as another user):
/// the scraper's root is then not its owner and, without `DAC_OVERRIDE`,
/// could not write its output there. A root-owned task dir stays as it is.
pub async fn share_task_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if tokio::fs::metadata(dir).await?.uid() != 0 {
        share_dir(dir).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_capability_that_reaches_the_network_or_devices_is_given_back() {
        for cap in [
            "NET_RAW",
            "NET_ADMIN",
            "MKNOD",
            "DAC_OVERRIDE",
            "SYS_ADMIN",
            "SYS_PTRACE",
        ] {
            assert!(!OFFLINER_CAPS.contains(&cap), "{cap}");
        }
    }

    #[tokio::test]
    async fn a_shared_dir_is_sticky_and_open_to_all() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        share_dir(dir.path()).await.unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o1777);
    }
}
