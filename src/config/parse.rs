//! Parsers of one variable's value (already trimmed, never empty) into its
//! setting. Each returns what is wrong as text; [`super::vars::Env`] puts
//! the variable's name in front. They must not read the environment nor
//! look at another variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use lapin::uri::AMQPUri;

use super::{
    BrokerUrl, LogFormat, LogLimit, MAX_UPLOAD_STREAMS, PullPolicy, QueueName, RunnerKind,
    UploadStreams,
};
use crate::offliner::AllowList;

/// Docker's copy of a container's output rotates over this many files
/// (`max-file`), so the newest lines survive a rotation with 4/5 of the
/// bound still on disk.
pub const CONTAINER_LOG_FILES: u32 = 5;
/// Longest path the kernel takes (PATH_MAX, 4096, less its NUL).
const PATH_MAX: usize = 4095;
/// Longest path the worker appends to ZIM_DIR or WORKING_DIR: `/<task id,
/// 64>/<a file name, 255>` (the sockets dir, the log and the markers are
/// shorter).
const LONGEST_SUFFIX: usize = 1 + 64 + 1 + 255;
/// Longest ZIM_DIR or WORKING_DIR: every path below it still fits PATH_MAX.
pub const MAX_DIR_LEN: usize = PATH_MAX - LONGEST_SUFFIX;

pub(super) fn bounded(value: &str, min: u64, max: u64) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "is {value:?}; expected a whole number from {min} to {max}"
        )),
    }
}

pub(super) fn port(value: &str) -> Result<u16, String> {
    bounded(value, 1, 65535).map(|p| p as u16)
}

pub(super) fn username(value: &str) -> Result<String, String> {
    if value
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '@')
    {
        return Err("must not contain spaces, control characters or '@'".to_owned());
    }
    Ok(value.to_owned())
}

/// Node names become part of the Celery hostname, pidbox queue names and
/// container names, so they are held to Docker's container-name alphabet.
pub(super) fn node_name(value: &str) -> Result<String, String> {
    if value == "default_node_name" {
        return Err("is still \"default_node_name\" from the README example; \
             choose a name for this machine (e.g. its host name)"
            .to_owned());
    }
    let mut chars = value.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !first_ok || !rest_ok || value.len() > 63 {
        return Err(format!(
            "is {value:?}; use 1 to 63 letters, digits, '_', '.' or '-', starting with a letter or digit"
        ));
    }
    Ok(value.to_owned())
}

pub(super) fn queues(value: &str) -> Result<Vec<QueueName>, String> {
    let mut out = Vec::new();
    for part in value.split(',').map(str::trim) {
        if part.is_empty() {
            continue;
        }
        let queue = part.parse::<QueueName>().map_err(|()| {
            format!("has unknown queue {part:?}; choose from default, small, medium, large, debug")
        })?;
        if !out.contains(&queue) {
            out.push(queue);
        }
    }
    if out.is_empty() {
        return Err("names no queue; e.g. QUEUES=default,small".to_owned());
    }
    Ok(out)
}

pub(super) fn absolute_path(value: &str) -> Result<PathBuf, String> {
    if value.contains('\0') {
        return Err("contains a NUL character".to_owned());
    }
    let path = PathBuf::from(value);
    if !path.is_absolute() {
        return Err(format!(
            "is {value:?}; expected an absolute path (starting with /)"
        ));
    }
    Ok(path)
}

/// An absolute dir path short enough for every path the worker makes in it.
pub(super) fn dir_path(value: &str) -> Result<PathBuf, String> {
    let path = absolute_path(value)?;
    let len = path.as_os_str().len();
    if len > MAX_DIR_LEN {
        return Err(format!(
            "is {len} bytes long, over the {MAX_DIR_LEN} the worker can use \
             (PATH_MAX {PATH_MAX} less {LONGEST_SUFFIX} for a task's files); use a shorter path"
        ));
    }
    Ok(path)
}

pub(super) fn working_dir(value: &str) -> Result<PathBuf, String> {
    let path = dir_path(value)?;
    if path.to_string_lossy().contains(':') {
        return Err(format!(
            "is {:?}; it must not contain ':', which separates the parts of a Docker bind mount",
            path.display()
        ));
    }
    Ok(path)
}

pub(super) fn host_name(value: &str) -> Result<String, String> {
    let ok = value.len() <= 253
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'));
    if ok {
        Ok(value.to_owned())
    } else {
        Err(format!("is {value:?}; expected a host name or IP address"))
    }
}

pub(super) fn http_url(value: &str) -> Result<String, String> {
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"));
    match rest {
        Some(rest)
            if !rest.is_empty()
                && !rest.starts_with('/')
                && !value.contains(char::is_whitespace) =>
        {
            Ok(value.trim_end_matches('/').to_owned())
        }
        _ => Err(format!("is {value:?}; expected an http:// or https:// URL")),
    }
}

pub(super) fn broker_url(value: &str) -> Result<BrokerUrl, String> {
    if !(value.starts_with("amqp://") || value.starts_with("amqps://")) {
        return Err("must start with amqp:// or amqps://".to_owned());
    }
    // The parser's message may quote the URL, password included: say only
    // that it is malformed.
    let uri = AMQPUri::from_str(value).map_err(|_| {
        "is not a valid AMQP URL (amqp[s]://user:password@host:port/vhost, \
         with special characters percent-encoded)"
            .to_owned()
    })?;
    if uri.authority.host.is_empty() {
        return Err("has no host".to_owned());
    }
    Ok(BrokerUrl(uri))
}

/// `SHA256:<43 base64 chars>` fingerprints, as `ssh-keygen -lf` prints them,
/// separated by commas.
pub(super) fn host_key_pins(value: &str) -> Result<Vec<String>, String> {
    let mut pins = Vec::new();
    for pin in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let ok = pin.strip_prefix("SHA256:").is_some_and(|b64| {
            b64.len() == 43
                && b64
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        });
        if !ok {
            return Err(format!(
                "has {pin:?}; expected SHA256 fingerprints such as \
                 SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s (what `ssh-keygen -lf` prints), \
                 separated by commas"
            ));
        }
        pins.push(pin.to_owned());
    }
    Ok(pins)
}

pub(super) fn upload_streams(value: &str) -> Result<UploadStreams, String> {
    if value.eq_ignore_ascii_case("auto") {
        return Ok(UploadStreams::Auto);
    }
    match value.parse::<u8>() {
        Ok(n) if (1..=MAX_UPLOAD_STREAMS).contains(&n) => Ok(UploadStreams::Fixed(n)),
        _ => Err(format!(
            "is {value:?}; expected `auto` or a number of SSH connections from 1 \
             to {MAX_UPLOAD_STREAMS} (unset it for `auto`)"
        )),
    }
}

pub(super) fn pull_policy(value: &str) -> Result<PullPolicy, String> {
    match value {
        "always" => Ok(PullPolicy::Always),
        "if-missing" => Ok(PullPolicy::IfMissing),
        "never" => Ok(PullPolicy::Never),
        other => Err(format!("is {other:?}; use always, if-missing or never")),
    }
}

pub(super) fn runner(value: &str) -> Result<RunnerKind, String> {
    match value {
        "docker" => Ok(RunnerKind::Docker),
        "simulate" => Ok(RunnerKind::Simulate),
        other => Err(format!("is {other:?}; use docker or simulate")),
    }
}

pub(super) fn log_format(value: &str) -> Result<LogFormat, String> {
    match value {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("is {other:?}; use \"text\" or \"json\"")),
    }
}

pub(super) fn allow_list(value: &str) -> Result<AllowList, String> {
    AllowList::parse(value).map_err(|e| format!("is {value:?}: {e}"))
}

pub(super) fn image_name(value: &str) -> Result<String, String> {
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "is {value:?}; expected an image name such as redis:7"
        ));
    }
    Ok(value.to_owned())
}

/// A Docker network's name, as Docker accepts it.
pub(super) fn network_name(value: &str) -> Result<String, String> {
    let mut chars = value.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok
        || value.len() > 128
        || !chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        return Err(format!(
            "is {value:?}; expected a Docker network's name (letters, digits, `_`, `.`, `-`, \
             starting with a letter or digit, at most 128)"
        ));
    }
    Ok(value.to_owned())
}

/// Hours; 0 is `None` (swept only under disk pressure).
pub(super) fn kept_dir_max_age(value: &str) -> Result<Option<Duration>, String> {
    let hours = bounded(value, 0, 10 * 365 * 24)
        .map_err(|problem| format!("{problem} (hours; 0 sweeps only under disk pressure)"))?;
    Ok((hours > 0).then(|| Duration::from_secs(hours * 3600)))
}

pub(super) fn nano_cpus(value: &str) -> Result<i64, String> {
    match value.parse::<f64>() {
        Ok(c) if c.is_finite() && (0.01..=1024.0).contains(&c) => Ok((c * 1e9).round() as i64),
        _ => Err(format!(
            "is {value:?}; expected a number of CPUs such as 2 or 1.5"
        )),
    }
}

/// MB in all, over [`CONTAINER_LOG_FILES`] files; 0 is `None` (the
/// engine's own log config).
pub(super) fn log_limit(value: &str) -> Result<Option<LogLimit>, String> {
    let mb = bounded(value, 0, 1 << 20)?;
    Ok((mb > 0).then(|| LogLimit::total(mb << 20, CONTAINER_LOG_FILES)))
}

pub(super) fn metrics_addr(value: &str) -> Result<SocketAddr, String> {
    value.parse::<SocketAddr>().map_err(|_| {
        format!(
            "is {value:?}; expected an IP address and port to listen on, such as \
             0.0.0.0:9090 or 127.0.0.1:9090 (unset it to turn the listener off)"
        )
    })
}
