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
//! base64 key blob and compare fingerprints themselves. Tokens and the
//! password are [`Secret`]s; none of them is ever put in a log line or an
//! error message.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use thiserror::Error;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{DispatcherSettings, Secret};
use crate::retry::Retry;

/// Every request gives up after this long (connecting included).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Connecting gives up sooner: a dispatcher that is down is seen at once.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The token is refreshed once this share of its lifetime has passed.
const REFRESH_AT_PERCENT: u32 = 80;
/// Never refresh sooner than this after a grant, whatever `expires_in`
/// says (a dispatcher answering `expires_in: 0` must not make a busy loop).
const MIN_REFRESH_DELAY: Duration = Duration::from_secs(1);
/// The lifetime assumed when a token answer has no `expires_in`.
const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(600);
/// How much of an unexpected answer's body an error quotes.
const BODY_QUOTE_CHARS: usize = 300;

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

/// A key registered for the user at the dispatcher, as `GET
/// /users/<username>/keys` lists it. Unknown fields are ignored and the
/// optional ones may be missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredKey {
    #[serde(default)]
    pub name: String,
    /// MD5 of the public key blob, lowercase hex without colons.
    pub fingerprint: String,
    /// The public key blob, base64.
    #[serde(default)]
    pub key: String,
    /// `RSA` at the Zimfarm dispatcher.
    #[serde(rename = "type", default, deserialize_with = "lenient_string")]
    pub key_type: Option<String>,
    /// When it was registered, as the dispatcher wrote it.
    #[serde(default, deserialize_with = "lenient_string")]
    pub added: Option<String>,
    /// When it was last used, as the dispatcher wrote it (null if never).
    #[serde(default, deserialize_with = "lenient_string")]
    pub last_used: Option<String>,
}

impl RegisteredKey {
    /// Whether this key has the MD5 fingerprint `md5`, given as hex with or
    /// without colons, in either case, with or without `MD5:` in front (as
    /// `ssh-keygen -l -E md5` prints it).
    pub fn matches_fingerprint(&self, md5: &str) -> bool {
        normalize_fingerprint(&self.fingerprint) == normalize_fingerprint(md5)
    }
}

fn normalize_fingerprint(fp: &str) -> String {
    let fp = fp.trim();
    let fp = fp
        .strip_prefix("MD5:")
        .or_else(|| fp.strip_prefix("md5:"))
        .unwrap_or(fp);
    fp.chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Accepts a string, null, or anything else (kept as its JSON text), so a
/// dispatcher that writes dates as objects or numbers does not break the
/// key listing.
fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Null => None,
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    })
}

/// One grant's tokens.
struct Session {
    access_token: Secret,
    /// Single use: the dispatcher hands a new one with every grant.
    refresh_token: Option<Secret>,
    /// When the grant was asked for (a little before the dispatcher started
    /// the token's clock, so the lifetime is counted conservatively).
    obtained: Instant,
    expires_in: Duration,
    /// Tells sessions apart: a caller that saw a 401 with session N logs in
    /// again only if nobody replaced N in the meantime.
    generation: u64,
}

impl Session {
    fn expires_at(&self) -> Instant {
        self.obtained + self.expires_in
    }

    /// When the keeper refreshes this session.
    fn refresh_at(&self) -> Instant {
        self.obtained + refresh_delay(self.expires_in)
    }
}

/// How long after a grant its token is refreshed: at 80% of its lifetime,
/// and not sooner than [`MIN_REFRESH_DELAY`].
fn refresh_delay(expires_in: Duration) -> Duration {
    (expires_in * REFRESH_AT_PERCENT / 100).max(MIN_REFRESH_DELAY)
}

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

/// Why a refresh did not give a new session.
enum RefreshError {
    /// The dispatcher does not take this refresh token (used, expired,
    /// unknown): a password login is the way on.
    Refused,
    Other(DispatcherError),
}

impl Dispatcher {
    /// A client for the dispatcher API at `base_url` (e.g.
    /// `https://farm.openzim.org/api`). Does not connect.
    /// A client for the configured dispatcher and account.
    pub fn from_settings(settings: &DispatcherSettings) -> Result<Self, DispatcherError> {
        Self::new(&settings.url, &settings.username, settings.password.clone())
    }

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

    /// `GET {base}/users/{username}/keys`. Logs in first when there is no
    /// session; a 401 triggers one new login and one retry.
    pub async fn keys(&self) -> Result<Vec<RegisteredKey>, DispatcherError> {
        let url = self.inner.keys_url.clone();
        let response = self
            .authorized(|http, token| {
                http.request(Method::GET, url.clone())
                    .bearer_auth(token.expose())
            })
            .await?;
        let url = redact_url(&self.inner.keys_url);
        let body = expect_success(response, &url).await?;
        serde_json::from_slice(&body).map_err(|e| DispatcherError::InvalidResponse {
            url,
            detail: format!("not a list of keys: {e}"),
        })
    }

    /// `POST {base}/users/{username}/keys` with `{"name", "key"}`; `key` is
    /// the base64 public key blob only (no `ssh-rsa ` in front, no comment).
    /// Same session rules as [`Dispatcher::keys`].
    pub async fn add_key(&self, name: &str, key_base64: &str) -> Result<(), DispatcherError> {
        let url = self.inner.keys_url.clone();
        let body = serde_json::json!({ "name": name, "key": key_base64 });
        let response = self
            .authorized(|http, token| {
                http.request(Method::POST, url.clone())
                    .bearer_auth(token.expose())
                    .json(&body)
            })
            .await?;
        expect_success(response, &redact_url(&self.inner.keys_url)).await?;
        tracing::info!(username = %self.inner.username, name, "registered an SSH key at the dispatcher");
        Ok(())
    }

    /// Keeps the access token fresh until `cancel` fires: logs in when there
    /// is no session, refreshes at 80% of the token's lifetime with the
    /// current refresh token (and stores the new one), logs in with the
    /// password when a refresh is refused, and waits 1 s, 2 s, 4 s... up to
    /// 5 min between failed attempts. Never gives up; the returned task ends
    /// only when `cancel` fires.
    pub fn spawn_keeper(&self, cancel: CancellationToken) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move { this.keep(cancel).await })
    }

    async fn keep(self, cancel: CancellationToken) {
        let inner = &self.inner;
        let mut seen = inner.session.subscribe();
        let mut retry = Retry::dispatcher();
        loop {
            let current = seen.borrow_and_update().clone();
            if let Some(session) = &current {
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => return,
                    // Someone else logged in: plan from the new session.
                    _ = seen.changed() => continue,
                    () = tokio::time::sleep_until(session.refresh_at()) => {}
                }
            }
            let attempt = async {
                let _grant = inner.grant.lock().await;
                let now = inner.session.borrow().clone();
                if generation(&now) != generation(&current) {
                    // Replaced while we waited for the lock: nothing to do.
                    return Ok(());
                }
                match &now {
                    None => inner.password_grant().await,
                    Some(session) => inner.refresh_or_login(session).await,
                }
            };
            let result = tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                result = attempt => result,
            };
            match result {
                Ok(()) => retry.reset(),
                Err(error) => {
                    let delay = retry.delay();
                    let what = if current.is_some() {
                        "refreshing the dispatcher token failed"
                    } else {
                        "logging in to the dispatcher failed"
                    };
                    tracing::warn!(%error, retry_in_s = delay.as_secs(), "{what}; will retry");
                    let _ = seen.borrow_and_update();
                    tokio::select! {
                        biased;
                        () = cancel.cancelled() => return,
                        // Someone else logged in meanwhile: start over.
                        _ = seen.changed() => retry.reset(),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
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

fn generation(session: &Option<Arc<Session>>) -> Option<u64> {
    session.as_ref().map(|s| s.generation)
}

impl Inner {
    fn token_url_text(&self) -> String {
        redact_url(&self.token_url)
    }

    fn invalid_token_response(&self, detail: &str) -> DispatcherError {
        DispatcherError::InvalidResponse {
            url: self.token_url_text(),
            detail: detail.to_owned(),
        }
    }

    /// The current session, after a login when there is none or a refresh
    /// when it has expired.
    async fn usable_session(&self) -> Result<Arc<Session>, DispatcherError> {
        if let Some(session) = self.session.borrow().clone()
            && Instant::now() < session.expires_at()
        {
            return Ok(session);
        }
        let _grant = self.grant.lock().await;
        let now = self.session.borrow().clone();
        match now {
            Some(session) if Instant::now() < session.expires_at() => return Ok(session),
            Some(session) => self.refresh_or_login(&session).await?,
            None => self.password_grant().await?,
        }
        self.session
            .borrow()
            .clone()
            .ok_or_else(|| self.invalid_token_response("no session after logging in"))
    }

    /// Refreshes `session`; when the dispatcher refuses its refresh token
    /// (or it has none), logs in with the password. Call with `grant` held.
    async fn refresh_or_login(&self, session: &Session) -> Result<(), DispatcherError> {
        let Some(refresh_token) = &session.refresh_token else {
            return self.password_grant().await;
        };
        match self.refresh_grant(refresh_token).await {
            Ok(()) => Ok(()),
            Err(RefreshError::Refused) => {
                tracing::info!(
                    username = %self.username,
                    "the dispatcher refused the refresh token; logging in with the password"
                );
                self.password_grant().await
            }
            Err(RefreshError::Other(e)) => Err(e),
        }
    }

    /// The password grant. Call with `grant` held.
    async fn password_grant(&self) -> Result<(), DispatcherError> {
        let form = [
            ("grant_type", "password"),
            ("username", self.username.as_str()),
            ("password", self.password.expose()),
        ];
        let started = Instant::now();
        let response = self
            .send(self.http.post(self.token_url.clone()).form(&form))
            .await?;
        let status = response.status();
        if matches!(status, StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED) {
            let body = response.bytes().await.unwrap_or_default();
            tracing::warn!(
                username = %self.username,
                status = status.as_u16(),
                reason = %oauth2_error(&body),
                "the dispatcher refused the password login"
            );
            return Err(DispatcherError::BadCredentials {
                username: self.username.clone(),
            });
        }
        let session = self.token_response(response, started).await?;
        tracing::info!(
            username = %self.username,
            expires_in_s = session.expires_in.as_secs(),
            "logged in to the dispatcher"
        );
        self.session.send_replace(Some(Arc::new(session)));
        Ok(())
    }

    /// The refresh grant with a (single-use) refresh token. Call with
    /// `grant` held.
    async fn refresh_grant(&self, refresh_token: &Secret) -> Result<(), RefreshError> {
        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose()),
        ];
        let started = Instant::now();
        let response = self
            .send(self.http.post(self.token_url.clone()).form(&form))
            .await
            .map_err(RefreshError::Other)?;
        let status = response.status();
        if matches!(status, StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED) {
            let body = response.bytes().await.unwrap_or_default();
            tracing::debug!(
                status = status.as_u16(),
                reason = %oauth2_error(&body),
                "the dispatcher refused the refresh token"
            );
            return Err(RefreshError::Refused);
        }
        let session = self
            .token_response(response, started)
            .await
            .map_err(RefreshError::Other)?;
        tracing::debug!(
            username = %self.username,
            expires_in_s = session.expires_in.as_secs(),
            "refreshed the dispatcher access token"
        );
        self.session.send_replace(Some(Arc::new(session)));
        Ok(())
    }

    /// Reads a token endpoint's answer into a session. The body is never
    /// quoted in errors: it holds tokens.
    async fn token_response(
        &self,
        response: Response,
        started: Instant,
    ) -> Result<Session, DispatcherError> {
        let url = self.token_url_text();
        let status = response.status();
        if !status.is_success() {
            let body = response.bytes().await.unwrap_or_default();
            return Err(DispatcherError::Http {
                status: status.as_u16(),
                url,
                body: quote_body(&body),
            });
        }
        let body = response.bytes().await.map_err(|e| unreachable(&url, &e))?;
        let tokens =
            TokenAnswer::parse(&body).map_err(|detail| self.invalid_token_response(detail))?;
        Ok(Session {
            access_token: tokens.access_token,
            refresh_token: tokens.refresh_token,
            obtained: started,
            expires_in: tokens.expires_in,
            generation: self.generations.fetch_add(1, Ordering::Relaxed) + 1,
        })
    }

    /// Sends a request; failing to get an answer is `Unreachable`.
    async fn send(&self, request: RequestBuilder) -> Result<Response, DispatcherError> {
        request.send().await.map_err(|e| {
            let url = e.url().map_or_else(|| self.base.clone(), redact_url);
            unreachable(&url, &e)
        })
    }
}

/// The fields of a successful token answer.
struct TokenAnswer {
    access_token: Secret,
    refresh_token: Option<Secret>,
    expires_in: Duration,
}

impl TokenAnswer {
    /// Reads the answer field by field, so that no error message can quote a
    /// token (serde's type errors quote the value they met).
    fn parse(body: &[u8]) -> Result<Self, &'static str> {
        let value: Value =
            serde_json::from_slice(body).map_err(|_| "the token answer is not JSON")?;
        let access_token = match value.get("access_token") {
            Some(Value::String(s)) if !s.is_empty() => Secret::new(s.as_str()),
            _ => return Err("the token answer has no access_token"),
        };
        match value.get("token_type") {
            None | Some(Value::Null) => {}
            Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => {}
            Some(_) => return Err("the token answer's token_type is not \"bearer\""),
        }
        let refresh_token = match value.get("refresh_token") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() => Some(Secret::new(s.as_str())),
            Some(_) => return Err("the token answer's refresh_token is not a string"),
        };
        let expires_in = match value.get("expires_in") {
            None | Some(Value::Null) => DEFAULT_EXPIRES_IN,
            Some(Value::Number(n)) => match n.as_f64() {
                Some(secs) if (0.0..1e9).contains(&secs) => Duration::from_secs_f64(secs),
                _ => return Err("the token answer's expires_in is out of range"),
            },
            Some(Value::String(s)) => match s.trim().parse::<u64>() {
                Ok(secs) if secs < 1_000_000_000 => Duration::from_secs(secs),
                _ => return Err("the token answer's expires_in is not a number"),
            },
            Some(_) => return Err("the token answer's expires_in is not a number"),
        };
        Ok(Self {
            access_token,
            refresh_token,
            expires_in,
        })
    }
}

/// The `error` (and `error_description`) of an OAuth2 error answer, for a
/// log line; the raw body, shortened, when it is not one.
fn oauth2_error(body: &[u8]) -> String {
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
async fn expect_success(response: Response, url: &str) -> Result<Vec<u8>, DispatcherError> {
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

fn unreachable(url: &str, error: &reqwest::Error) -> DispatcherError {
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
fn chain(error: &reqwest::Error) -> String {
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
fn redact_url(url: &Url) -> String {
    let mut url = url.clone();
    let _ = url.set_password(None);
    let _ = url.set_username("");
    url.to_string()
}

/// The start of a body, for an error message.
fn quote_body(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(empty answer)".to_owned()
    } else {
        truncate(text, BODY_QUOTE_CHARS)
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}…", &text[..cut]),
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use crate::proptest_config::{config, json, text};
    use proptest::prelude::*;

    const TOKEN_KEYS: &[&str] = &[
        "access_token",
        "token_type",
        "expires_in",
        "refresh_token",
        "error",
        "error_description",
    ];
    const KEY_KEYS: &[&str] = &["name", "fingerprint", "key", "type", "added", "last_used"];

    /// Objects with the given keys, each present or not, of any type.
    fn object(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
        proptest::collection::vec((proptest::sample::select(keys), json(keys)), 0..8).prop_map(
            |fields| Value::Object(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()),
        )
    }

    fn body(keys: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            json(keys).prop_map(|v| v.to_string().into_bytes()),
            object(keys).prop_map(|v| v.to_string().into_bytes()),
            proptest::collection::vec(object(keys), 0..4)
                .prop_map(|v| Value::Array(v).to_string().into_bytes()),
        ]
    }

    #[test]
    fn negative_zero_expires_in_is_zero() {
        let answer = TokenAnswer::parse(br#"{"access_token": "a", "expires_in": -0.0}"#)
            .expect("-0.0 is in range");
        assert_eq!(answer.expires_in, Duration::ZERO);
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn token_answers_never_panic_nor_quote_a_token(body in body(TOKEN_KEYS)) {
            match TokenAnswer::parse(&body) {
                Ok(answer) => {
                    prop_assert!(!answer.access_token.expose().is_empty());
                    prop_assert!(answer.expires_in < Duration::from_secs(1_000_000_000));
                }
                Err(message) => {
                    // The message is one of the fixed texts: no value in it.
                    prop_assert!(message.starts_with("the token answer"));
                }
            }
            let error = oauth2_error(&body);
            prop_assert!(error.chars().count() <= BODY_QUOTE_CHARS * 2 + 3);
        }

        #[test]
        fn valid_token_answer_reads_back(
            access in "[!-~]{1,64}",
            refresh in proptest::option::of("[!-~]{1,64}"),
            expires_in in 0..1_000_000_000_u64,
            as_string in any::<bool>(),
        ) {
            let expires: Value = if as_string { expires_in.to_string().into() } else { expires_in.into() };
            let body = serde_json::json!({
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": expires,
                "refresh_token": refresh,
            });
            let answer = TokenAnswer::parse(body.to_string().as_bytes())
                .map_err(TestCaseError::fail)?;
            prop_assert_eq!(answer.access_token.expose(), access.as_str());
            prop_assert_eq!(answer.refresh_token.as_ref().map(Secret::expose), refresh.as_deref());
            prop_assert_eq!(answer.expires_in, Duration::from_secs(expires_in));
        }

        #[test]
        fn key_lists_never_panic(body in body(KEY_KEYS), md5 in text()) {
            if let Ok(keys) = serde_json::from_slice::<Vec<RegisteredKey>>(&body) {
                for key in keys {
                    let _ = key.matches_fingerprint(&md5);
                    prop_assert!(key.matches_fingerprint(&key.fingerprint.clone()));
                }
            }
            let quoted = quote_body(&body);
            prop_assert!(quoted.chars().count() <= BODY_QUOTE_CHARS + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_keep_the_base_path_and_encode_the_username() {
        let d = Dispatcher::new("https://farm.example/api/", "a b/c", Secret::new("pw")).unwrap();
        assert_eq!(
            d.inner.token_url.as_str(),
            "https://farm.example/api/auth/oauth2"
        );
        assert_eq!(
            d.inner.keys_url.as_str(),
            "https://farm.example/api/users/a%20b%2Fc/keys"
        );
        let d = Dispatcher::new("http://127.0.0.1:8080", "bob", Secret::new("pw")).unwrap();
        assert_eq!(
            d.inner.token_url.as_str(),
            "http://127.0.0.1:8080/auth/oauth2"
        );
        assert_eq!(d.url(), "http://127.0.0.1:8080/");
    }

    #[test]
    fn bad_urls_are_refused() {
        for url in ["farm.openzim.org/api", "ftp://farm.example/", "mailto:x@y"] {
            let e = Dispatcher::new(url, "bob", Secret::new("pw")).unwrap_err();
            assert!(
                matches!(e, DispatcherError::InvalidUrl { .. }),
                "{url}: {e}"
            );
            assert!(e.to_string().starts_with("DISPATCHER_URL"), "{e}");
        }
    }

    #[test]
    fn debug_and_messages_show_no_secret() {
        let d = Dispatcher::new(
            "https://user:hunter2@farm.example/api",
            "bob",
            Secret::new("s3cr3t"),
        )
        .unwrap();
        let debug = format!("{d:?}");
        assert!(
            !debug.contains("s3cr3t") && !debug.contains("hunter2"),
            "{debug}"
        );
        assert!(debug.contains("bob"), "{debug}");
        assert_eq!(d.url(), "https://farm.example/api");
    }

    #[test]
    fn refresh_happens_at_80_percent_and_never_in_a_busy_loop() {
        assert_eq!(
            refresh_delay(Duration::from_secs(5)),
            Duration::from_secs(4)
        );
        assert_eq!(
            refresh_delay(Duration::from_secs(3600)),
            Duration::from_secs(2880)
        );
        assert_eq!(refresh_delay(Duration::ZERO), MIN_REFRESH_DELAY);
    }

    #[test]
    fn token_answers_are_read_without_quoting_tokens() {
        let t = TokenAnswer::parse(
            br#"{"access_token":"AT","token_type":"bearer","expires_in":3600,"refresh_token":"RT"}"#,
        )
        .ok()
        .unwrap();
        assert_eq!(t.access_token.expose(), "AT");
        assert_eq!(t.refresh_token.as_ref().map(Secret::expose), Some("RT"));
        assert_eq!(t.expires_in, Duration::from_secs(3600));

        let t = TokenAnswer::parse(br#"{"access_token":"AT"}"#)
            .ok()
            .unwrap();
        assert!(t.refresh_token.is_none());
        assert_eq!(t.expires_in, DEFAULT_EXPIRES_IN);

        for bad in [
            &br#"{"token_type":"bearer","refresh_token":"SECRET-RT"}"#[..],
            br#"{"access_token":"SECRET-AT","token_type":"mac"}"#,
            br#"{"access_token":"SECRET-AT","expires_in":"SECRET-X"}"#,
            br#"{"access_token":"SECRET-AT","refresh_token":["SECRET-RT"]}"#,
            b"SECRET-AT",
        ] {
            let detail = TokenAnswer::parse(bad).err().unwrap();
            assert!(!detail.contains("SECRET"), "{detail}");
        }
    }

    #[test]
    fn registered_keys_tolerate_missing_and_extra_fields() {
        let keys: Vec<RegisteredKey> = serde_json::from_str(
            r#"[{"name":"laptop","fingerprint":"0a1b","key":"AAAA","type":"RSA",
                 "added":"2019-05-01T10:00:00Z","last_used":null,"pkcs8_key":"-----BEGIN"},
                {"fingerprint":"ff00","added":{"$date":1556704800000}}]"#,
        )
        .unwrap();
        assert_eq!(keys[0].key_type.as_deref(), Some("RSA"));
        assert_eq!(keys[0].last_used, None);
        assert_eq!(keys[1].name, "");
        assert_eq!(keys[1].added.as_deref(), Some(r#"{"$date":1556704800000}"#));
        assert!(keys[0].matches_fingerprint("MD5:0A:1B"));
        assert!(keys[0].matches_fingerprint("0a1b"));
        assert!(!keys[0].matches_fingerprint("0a1c"));
    }

    #[test]
    fn messages_say_what_to_do() {
        let e = DispatcherError::BadCredentials {
            username: "bob".into(),
        };
        assert_eq!(
            e.to_string(),
            "the dispatcher refused USERNAME/PASSWORD for bob: check them \
             (they are your Zimfarm account's)"
        );
        assert!(!e.is_transient());
        let e = DispatcherError::Unreachable {
            url: "http://x/".into(),
            detail: "connection refused".into(),
        };
        assert!(e.to_string().contains("check DISPATCHER_URL"), "{e}");
        assert!(e.is_transient());
        assert!(
            DispatcherError::Http {
                status: 503,
                url: String::new(),
                body: String::new()
            }
            .is_transient()
        );
    }

    #[test]
    fn bodies_are_quoted_short() {
        assert_eq!(quote_body(b"  "), "(empty answer)");
        let long = "é".repeat(1000);
        let q = quote_body(long.as_bytes());
        assert_eq!(q.chars().count(), BODY_QUOTE_CHARS + 1);
        assert_eq!(
            oauth2_error(br#"{"error":"invalid_grant","error_description":"Username or password is invalid."}"#),
            "invalid_grant: Username or password is invalid."
        );
    }
}
