//! The OAuth2 session with the dispatcher: the password grant, the refresh
//! grant with the rotating, single-use refresh token, reading a token
//! answer without ever quoting it, and when a session is refreshed.
//!
//! Owns [`Session`] and the grants (called with the grant lock held, so no
//! refresh token is spent twice). It must not make API calls nor decide
//! when to retry: `keeper` and the authorized requests call it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::{Response, StatusCode};
use serde_json::Value;
use tokio::time::Instant;

use super::Inner;
use super::error::{DispatcherError, oauth2_error, quote_body, redact_url, unreachable};
use crate::config::Secret;

/// The token is refreshed once this share of its lifetime has passed.
const REFRESH_AT_PERCENT: u32 = 80;
/// Never refresh sooner than this after a grant, whatever `expires_in`
/// says (a dispatcher answering `expires_in: 0` must not make a busy loop).
pub(super) const MIN_REFRESH_DELAY: Duration = Duration::from_secs(1);
/// The lifetime assumed when a token answer has no `expires_in`.
pub(super) const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(600);

/// One grant's tokens.
pub(super) struct Session {
    pub(super) access_token: Secret,
    /// Single use: the dispatcher hands a new one with every grant.
    refresh_token: Option<Secret>,
    /// When the grant was asked for (a little before the dispatcher started
    /// the token's clock, so the lifetime is counted conservatively).
    obtained: Instant,
    expires_in: Duration,
    /// Tells sessions apart: a caller that saw a 401 with session N logs in
    /// again only if nobody replaced N in the meantime.
    pub(super) generation: u64,
}

impl Session {
    fn expires_at(&self) -> Instant {
        self.obtained + self.expires_in
    }

    /// When the keeper refreshes this session.
    pub(super) fn refresh_at(&self) -> Instant {
        self.obtained + refresh_delay(self.expires_in)
    }
}

/// How long after a grant its token is refreshed: at 80% of its lifetime,
/// and not sooner than [`MIN_REFRESH_DELAY`].
pub(super) fn refresh_delay(expires_in: Duration) -> Duration {
    (expires_in * REFRESH_AT_PERCENT / 100).max(MIN_REFRESH_DELAY)
}

/// What the token endpoint made of a grant.
enum Grant {
    /// A new session, now the current one.
    Granted { expires_in: Duration },
    /// 400 or 401, with the OAuth2 reason for a log line.
    Refused { status: u16, reason: String },
}

/// Why a refresh did not give a new session.
enum RefreshError {
    /// The dispatcher does not take this refresh token (used, expired,
    /// unknown): a password login is the way on.
    Refused,
    Other(DispatcherError),
}

pub(super) fn generation(session: &Option<Arc<Session>>) -> Option<u64> {
    session.as_ref().map(|s| s.generation)
}

impl Inner {
    fn token_url_text(&self) -> String {
        redact_url(&self.token_url)
    }

    pub(super) fn invalid_token_response(&self, detail: &str) -> DispatcherError {
        DispatcherError::InvalidResponse {
            url: self.token_url_text(),
            detail: detail.to_owned(),
        }
    }

    /// The current session, after a login when there is none or a refresh
    /// when it has expired.
    pub(super) async fn usable_session(&self) -> Result<Arc<Session>, DispatcherError> {
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
    pub(super) async fn refresh_or_login(&self, session: &Session) -> Result<(), DispatcherError> {
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
    pub(super) async fn password_grant(&self) -> Result<(), DispatcherError> {
        let form = [
            ("grant_type", "password"),
            ("username", self.username.as_str()),
            ("password", self.password.expose()),
        ];
        match self.grant(&form).await? {
            Grant::Granted { expires_in } => {
                tracing::info!(
                    username = %self.username,
                    expires_in_s = expires_in.as_secs(),
                    "logged in to the dispatcher"
                );
                Ok(())
            }
            Grant::Refused { status, reason } => {
                tracing::warn!(
                    username = %self.username,
                    status,
                    %reason,
                    "the dispatcher refused the password login"
                );
                Err(DispatcherError::BadCredentials {
                    username: self.username.clone(),
                })
            }
        }
    }

    /// The refresh grant with a (single-use) refresh token. Call with
    /// `grant` held.
    async fn refresh_grant(&self, refresh_token: &Secret) -> Result<(), RefreshError> {
        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose()),
        ];
        match self.grant(&form).await.map_err(RefreshError::Other)? {
            Grant::Granted { expires_in } => {
                tracing::debug!(
                    username = %self.username,
                    expires_in_s = expires_in.as_secs(),
                    "refreshed the dispatcher access token"
                );
                Ok(())
            }
            Grant::Refused { status, reason } => {
                tracing::debug!(status, %reason, "the dispatcher refused the refresh token");
                Err(RefreshError::Refused)
            }
        }
    }

    /// Posts a grant's `form` to the token endpoint; a session granted
    /// becomes the current one. A 400 or 401 is the dispatcher refusing it.
    async fn grant(&self, form: &[(&str, &str)]) -> Result<Grant, DispatcherError> {
        let started = Instant::now();
        let response = self
            .send(self.http.post(self.token_url.clone()).form(form))
            .await?;
        let status = response.status();
        if matches!(status, StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED) {
            let body = response.bytes().await.unwrap_or_default();
            return Ok(Grant::Refused {
                status: status.as_u16(),
                reason: oauth2_error(&body),
            });
        }
        let session = self.token_response(response, started).await?;
        let expires_in = session.expires_in;
        self.session.send_replace(Some(Arc::new(session)));
        Ok(Grant::Granted { expires_in })
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
}

/// The fields of a successful token answer.
pub(super) struct TokenAnswer {
    pub(super) access_token: Secret,
    pub(super) refresh_token: Option<Secret>,
    pub(super) expires_in: Duration,
}

impl TokenAnswer {
    /// Reads the answer field by field, so that no error message can quote a
    /// token (serde's type errors quote the value they met).
    pub(super) fn parse(body: &[u8]) -> Result<Self, &'static str> {
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
