//! The Zimfarm dispatcher's HTTP API (SPEC §7): the worker's OAuth2 session
//! and the SSH keys API.
//!
//! Owns the access token and the rotating, single-use refresh token: the
//! password grant ([`Dispatcher::login`]), keeping the token fresh for the
//! worker's whole life ([`Dispatcher::spawn_keeper`]: refresh before expiry,
//! fall back to the password when a refresh is refused, capped exponential
//! backoff while the dispatcher is down), one re-login when a call is
//! answered 401, and the list/add calls of `/users/<username>/keys`.
//!
//! It must not know about AMQP, tasks or the warehouse: callers hand it a
//! base64 key blob, or the MD5 fingerprint a registered key must match
//! (`keys`); they never hand it a key file. Tokens and the
//! password are [`Secret`]s; none of them is ever put in a log line or an
//! error message.
//!
//! - `token`: the session and its grants;
//! - `keeper`: keeping the token fresh;
//! - `keys`: the SSH keys API;
//! - `error`: [`DispatcherError`] and the texts of a failed exchange.
//!
//! This file holds the client itself and its authorized requests (one
//! re-login on a 401).

mod error;
mod keeper;
mod keys;
mod token;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use reqwest::{RequestBuilder, Response, StatusCode, Url};
use tokio::sync::{Mutex, watch};

pub use error::DispatcherError;
pub use keys::RegisteredKey;

use crate::config::{DispatcherSettings, Secret};
use error::{chain, redact_url, unreachable};
use token::{Session, generation};

/// Every request gives up after this long (connecting included).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Connecting gives up sooner: a dispatcher that is down is seen at once.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The dispatcher client. Cheap to clone: clones share one session.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// The base URL as given, for messages.
    base: String,
    token_url: Url,
    keys_url: Url,
    username: String,
    password: Secret,
    /// The current session; the keeper watches it to re-plan its refresh
    /// when someone else logged in.
    session: watch::Sender<Option<Arc<Session>>>,
    /// Held during every grant, so that two callers never spend the same
    /// single-use refresh token or log in twice for one 401.
    grant: Mutex<()>,
    generations: AtomicU64,
}

impl fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("url", &self.inner.base)
            .field("username", &self.inner.username)
            .field("logged_in", &self.inner.session.borrow().is_some())
            .finish_non_exhaustive()
    }
}

impl Dispatcher {
    /// A client for the configured dispatcher and account.
    pub fn from_settings(settings: &DispatcherSettings) -> Result<Self, DispatcherError> {
        Self::new(&settings.url, &settings.username, settings.password.clone())
    }

    /// A client for the dispatcher API at `base_url` (e.g.
    /// `https://farm.openzim.org/api`). Does not connect.
    pub fn new(base_url: &str, username: &str, password: Secret) -> Result<Self, DispatcherError> {
        let base = base_url.trim_end_matches('/').to_owned();
        let invalid = |detail: &str| DispatcherError::InvalidUrl {
            url: base.clone(),
            detail: detail.to_owned(),
        };
        let parsed = Url::parse(&base).map_err(|e| invalid(&e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(invalid("expected an http:// or https:// URL"));
        }
        let endpoint = |segments: &[&str]| -> Result<Url, DispatcherError> {
            let mut url = parsed.clone();
            url.path_segments_mut()
                .map_err(|()| invalid("it cannot have a path"))?
                .pop_if_empty()
                .extend(segments);
            Ok(url)
        };
        let token_url = endpoint(&["auth", "oauth2"])?;
        let keys_url = endpoint(&["users", username, "keys"])?;
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("zimfarm-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| invalid(&format!("cannot set up the HTTP client: {}", chain(&e))))?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                base: redact_url(&parsed),
                token_url,
                keys_url,
                username: username.to_owned(),
                password,
                session: watch::Sender::new(None),
                grant: Mutex::new(()),
                generations: AtomicU64::new(0),
            }),
        })
    }

    pub fn username(&self) -> &str {
        &self.inner.username
    }

    /// The API base URL (without credentials).
    pub fn url(&self) -> &str {
        &self.inner.base
    }

    /// Whether there is a session (it may have expired since).
    pub fn is_logged_in(&self) -> bool {
        self.inner.session.borrow().is_some()
    }

    /// Password grant: `POST {base}/auth/oauth2` with
    /// `grant_type=password&username&password`. A refusal (400 or 401) is
    /// [`DispatcherError::BadCredentials`].
    pub async fn login(&self) -> Result<(), DispatcherError> {
        let _grant = self.inner.grant.lock().await;
        self.inner.password_grant().await
    }

    /// Sends the request `build` makes with the current access token
    /// (logging in or refreshing first when there is none or it has
    /// expired). A 401 answer triggers one new login and one retry.
    async fn authorized<F>(&self, build: F) -> Result<Response, DispatcherError>
    where
        F: Fn(&reqwest::Client, &Secret) -> RequestBuilder,
    {
        let inner = &self.inner;
        let session = inner.usable_session().await?;
        let response = inner
            .send(build(&inner.http, &session.access_token))
            .await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        tracing::info!(
            username = %inner.username,
            "the dispatcher refused the access token; logging in again"
        );
        let session = {
            let _grant = inner.grant.lock().await;
            let now = inner.session.borrow().clone();
            if generation(&now) == Some(session.generation) {
                inner.password_grant().await?;
            }
            inner
                .session
                .borrow()
                .clone()
                .ok_or_else(|| inner.invalid_token_response("no session after logging in"))?
        };
        inner.send(build(&inner.http, &session.access_token)).await
    }
}

impl Inner {
    /// Sends a request; failing to get an answer is `Unreachable`.
    pub(super) async fn send(&self, request: RequestBuilder) -> Result<Response, DispatcherError> {
        request.send().await.map_err(|e| {
            let url = e.url().map_or_else(|| self.base.clone(), redact_url);
            unreachable(&url, &e)
        })
    }
}

#[cfg(test)]
mod tests;
