//! What can go wrong talking to the dispatcher, and how a failed HTTP
//! exchange becomes a [`DispatcherError`] that says what failed and what to
//! do: the URL without credentials, the start of an unexpected body, the
//! causes of a transport error.
//!
//! Owns the error type and those texts. It must not send requests, and it
//! never quotes a token or the password: a successful token answer is
//! never passed here.

use reqwest::{Response, Url};
use serde_json::Value;
use thiserror::Error;

use super::REQUEST_TIMEOUT;

/// How much of an unexpected answer's body an error quotes.
pub(super) const BODY_QUOTE_CHARS: usize = 300;

/// What went wrong talking to the dispatcher. Each message says what failed
/// and what to do; none contains a token or the password.
#[derive(Debug, Clone, Error)]
pub enum DispatcherError {
    #[error(
        "the dispatcher refused USERNAME/PASSWORD for {username}: check them \
         (they are your Zimfarm account's)"
    )]
    BadCredentials { username: String },
    #[error(
        "cannot reach the dispatcher at {url}: {detail}; check DISPATCHER_URL \
         and this host's network"
    )]
    Unreachable { url: String, detail: String },
    #[error("the dispatcher answered {status} to {url}: {body}")]
    Http {
        status: u16,
        url: String,
        body: String,
    },
    #[error(
        "the dispatcher's answer to {url} is not what the worker expects ({detail}); \
         is DISPATCHER_URL the Zimfarm API (e.g. https://farm.openzim.org/api)?"
    )]
    InvalidResponse { url: String, detail: String },
    #[error("DISPATCHER_URL {url} cannot be used: {detail}")]
    InvalidUrl { url: String, detail: String },
}

impl DispatcherError {
    /// Whether waiting and trying again may help (the dispatcher is down,
    /// overloaded or answered garbage), as opposed to a refusal.
    pub fn is_transient(&self) -> bool {
        match self {
            DispatcherError::Unreachable { .. } | DispatcherError::InvalidResponse { .. } => true,
            DispatcherError::Http { status, .. } => *status >= 500 || *status == 429,
            DispatcherError::BadCredentials { .. } | DispatcherError::InvalidUrl { .. } => false,
        }
    }
}

/// The `error` (and `error_description`) of an OAuth2 error answer, for a
/// log line; the raw body, shortened, when it is not one.
pub(super) fn oauth2_error(body: &[u8]) -> String {
    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) {
        let field = |name: &str| map.get(name).and_then(Value::as_str).map(str::to_owned);
        match (field("error"), field("error_description")) {
            (Some(e), Some(d)) => return format!("{e}: {}", truncate(&d, BODY_QUOTE_CHARS)),
            (Some(e), None) => return truncate(&e, BODY_QUOTE_CHARS),
            _ => {}
        }
    }
    quote_body(body)
}

/// The body of a successful answer, or `Http` with the start of the body.
pub(super) async fn expect_success(
    response: Response,
    url: &str,
) -> Result<Vec<u8>, DispatcherError> {
    let status = response.status();
    let body = response.bytes().await.map_err(|e| unreachable(url, &e))?;
    if status.is_success() {
        Ok(body.to_vec())
    } else {
        Err(DispatcherError::Http {
            status: status.as_u16(),
            url: url.to_owned(),
            body: quote_body(&body),
        })
    }
}

pub(super) fn unreachable(url: &str, error: &reqwest::Error) -> DispatcherError {
    let detail = if error.is_timeout() {
        format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())
    } else {
        chain(error)
    };
    DispatcherError::Unreachable {
        url: url.to_owned(),
        detail,
    }
}

/// An error and its sources, `a: b: c`, without the URL reqwest puts in its
/// own message (we say which URL ourselves, without credentials).
pub(super) fn chain(error: &reqwest::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(error);
    while let Some(e) = source {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = e.source();
    }
    if parts.is_empty() {
        parts.push(
            if error.is_connect() {
                "cannot connect"
            } else if error.is_body() || error.is_decode() {
                "the answer was cut short"
            } else {
                "the request failed"
            }
            .to_owned(),
        );
    }
    parts.join(": ")
}

/// A URL as messages show it: without user or password.
pub(super) fn redact_url(url: &Url) -> String {
    let mut url = url.clone();
    let _ = url.set_password(None);
    let _ = url.set_username("");
    url.to_string()
}

/// The start of a body, for an error message.
pub(super) fn quote_body(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(empty answer)".to_owned()
    } else {
        truncate(text, BODY_QUOTE_CHARS)
    }
}

pub(super) fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}…", &text[..cut]),
    }
}
