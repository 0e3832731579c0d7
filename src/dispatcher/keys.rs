//! The SSH keys API, `/users/<username>/keys`: the keys registered for
//! the user ([`RegisteredKey`], read leniently) and registering a new one.
//!
//! Owns those two calls and the fingerprint comparison. It must not hold
//! or renew tokens (it asks [`Dispatcher`]'s authorized requests) nor read
//! key files: callers hand it a base64 key blob.

use reqwest::Method;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::Dispatcher;
use super::error::{DispatcherError, expect_success, redact_url};

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

impl Dispatcher {
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
}
