//! A stand-in for the Zimfarm dispatcher's HTTP API, as SPEC §7 describes
//! it, for the worker's tests and demos.
//!
//! It serves, under `http://127.0.0.1:<port>/api`:
//! - `POST /auth/oauth2`, form `grant_type=password&username&password` or
//!   `grant_type=refresh_token&refresh_token`, answering
//!   `{access_token, token_type: "bearer", expires_in, refresh_token}`.
//!   Refused grants get 401 `{"error": "invalid_grant", ...}` (what the
//!   Zimfarm dispatcher answers), malformed ones 400. Refresh tokens are
//!   single use: each grant hands a new one, and a used or unknown one is
//!   refused. Access tokens expire after `expires_in` seconds (then 401).
//! - `GET /users/<username>/keys` (Bearer): `[{name, fingerprint, key, type,
//!   added, last_used}]`, fingerprint = MD5 of the decoded key blob,
//!   lowercase hex without colons.
//! - `POST /users/<username>/keys` (Bearer) `{"name", "key"}`: 201; a key
//!   already registered (same fingerprint) is 400.
//!
//! It runs in a thread of its own with its own tokio runtime, so it works
//! the same under any test runtime and as a process
//! (`examples/dispatcher_standin.rs`). [`DispatcherStandin::stop`] drops
//! that runtime, which closes every connection at once, like a crashed
//! server; [`DispatcherStandin::start`] serves again on the same port with
//! the same users, keys and tokens. Counters say what the client did.
//!
//! This file is self-contained (the example includes it by path).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::rejection::{FormRejection, JsonRejection};
use axum::extract::{Form, Json, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Serialize;
use serde_json::{Value, json};

/// The routes as the counters name them.
pub const TOKEN_ROUTE: &str = "POST /auth/oauth2";
pub const LIST_KEYS_ROUTE: &str = "GET /users/{username}/keys";
pub const ADD_KEY_ROUTE: &str = "POST /users/{username}/keys";
/// Any other request (answered 404).
pub const OTHER_ROUTE: &str = "other";

/// The lifetime of access tokens until [`DispatcherStandin::set_expires_in`]
/// (the Zimfarm dispatcher's own).
pub const DEFAULT_EXPIRES_IN: u64 = 3600;

/// A registered key, as the keys API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredKey {
    pub name: String,
    pub fingerprint: String,
    pub key: String,
    #[serde(rename = "type")]
    pub key_type: String,
    pub added: String,
    pub last_used: Option<String>,
}

/// What the stand-in has seen since it was made (or since
/// [`DispatcherStandin::reset_counters`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Password grants that gave tokens.
    pub password_grants: u64,
    /// Refresh grants that gave tokens.
    pub refresh_grants: u64,
    /// Password grants refused (unknown user or wrong password).
    pub refused_passwords: u64,
    /// Refresh grants refused (used, revoked or unknown refresh token).
    pub refused_refreshes: u64,
    /// Every 401 answer, on any route.
    pub unauthorized: u64,
    /// Requests per route (see [`TOKEN_ROUTE`] and the others).
    pub requests: BTreeMap<String, u64>,
}

impl Counters {
    pub fn requests_to(&self, route: &str) -> u64 {
        self.requests.get(route).copied().unwrap_or(0)
    }
}

/// The dispatcher stand-in. Dropping it stops it.
pub struct DispatcherStandin {
    port: u16,
    shared: Arc<Mutex<Farm>>,
    server: Mutex<Option<Server>>,
}

/// The serving thread.
struct Server {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// Everything the dispatcher knows; it outlives stops and starts.
struct Farm {
    users: HashMap<String, User>,
    expires_in: u64,
    /// access token → its grant
    access_tokens: HashMap<String, AccessGrant>,
    /// refresh token → username
    refresh_tokens: HashMap<String, String>,
    /// Every token ever handed out, for tests that look for leaks.
    issued: Vec<String>,
    counters: Counters,
}

struct User {
    password: String,
    keys: Vec<StoredKey>,
}

struct AccessGrant {
    username: String,
    expires: Instant,
}

impl Default for DispatcherStandin {
    fn default() -> Self {
        Self::new()
    }
}

impl DispatcherStandin {
    /// A stand-in on a free port of 127.0.0.1, not serving yet (a
    /// dispatcher that is down until [`DispatcherStandin::start`]).
    pub fn new() -> Self {
        let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port on 127.0.0.1")
            .port();
        Self::with_port(port)
    }

    /// A stand-in that will serve on `port` (0: a free one), not serving yet.
    pub fn with_port(port: u16) -> Self {
        if port == 0 {
            return Self::new();
        }
        Self {
            port,
            shared: Arc::new(Mutex::new(Farm {
                users: HashMap::new(),
                expires_in: DEFAULT_EXPIRES_IN,
                access_tokens: HashMap::new(),
                refresh_tokens: HashMap::new(),
                issued: Vec::new(),
                counters: Counters::default(),
            })),
            server: Mutex::new(None),
        }
    }

    /// A stand-in serving on a free port.
    pub fn spawn() -> Self {
        let standin = Self::new();
        standin.start();
        standin
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The API base, what DISPATCHER_URL would be: `http://127.0.0.1:<port>/api`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/api", self.port)
    }

    /// Serves (again); returns once the port listens. Panics if it cannot.
    pub fn start(&self) {
        self.try_start().unwrap_or_else(|e| {
            panic!(
                "dispatcher stand-in cannot listen on port {}: {e}",
                self.port
            )
        });
    }

    /// Serves (again); returns once the port listens. Does nothing if it
    /// is serving already.
    pub fn try_start(&self) -> std::io::Result<()> {
        let mut server = self.server.lock().unwrap();
        if server.is_some() {
            return Ok(());
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let shared = self.shared.clone();
        let port = self.port;
        let thread = std::thread::Builder::new()
            .name(format!("dispatcher-standin-{port}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match listen(port) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let serve = axum::serve(listener, router(shared));
                    tokio::select! {
                        _ = std::future::IntoFuture::into_future(serve) => {}
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime here drops every connection task:
                // clients see their connections closed, as with a crash.
                drop(runtime);
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {
                *server = Some(Server {
                    stop: stop_tx,
                    thread,
                });
                Ok(())
            }
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(std::io::Error::other(
                    "the stand-in's thread ended at start",
                ))
            }
        }
    }

    /// Stops serving: the port is closed and every open connection cut.
    /// Users, keys and tokens are kept for the next start.
    pub fn stop(&self) {
        let server = self.server.lock().unwrap().take();
        if let Some(server) = server {
            let _ = server.stop.send(());
            let _ = server.thread.join();
        }
    }

    pub fn is_running(&self) -> bool {
        self.server.lock().unwrap().is_some()
    }

    fn farm(&self) -> MutexGuard<'_, Farm> {
        self.shared.lock().unwrap()
    }

    /// Adds a user, or sets the password of one.
    pub fn add_user(&self, username: &str, password: &str) {
        let mut farm = self.farm();
        match farm.users.get_mut(username) {
            Some(user) => user.password = password.to_owned(),
            None => {
                farm.users.insert(
                    username.to_owned(),
                    User {
                        password: password.to_owned(),
                        keys: Vec::new(),
                    },
                );
            }
        }
    }

    /// The lifetime of access tokens handed out from now on, in seconds.
    pub fn set_expires_in(&self, seconds: u64) {
        self.farm().expires_in = seconds;
    }

    /// Registers a key for `username` as `POST /users/<username>/keys`
    /// would: `key` is the base64 blob or a whole `ssh-... AAAA... comment`
    /// line. Returns the stored key, or why it was refused.
    pub fn register_key(&self, username: &str, name: &str, key: &str) -> Result<StoredKey, String> {
        let mut farm = self.farm();
        let user = farm
            .users
            .get_mut(username)
            .ok_or_else(|| format!("no user {username}"))?;
        add_key(user, name, key)
    }

    /// The keys registered for `username`.
    pub fn keys(&self, username: &str) -> Vec<StoredKey> {
        self.farm()
            .users
            .get(username)
            .map(|u| u.keys.clone())
            .unwrap_or_default()
    }

    /// Forgets every access and refresh token: the next call with any of
    /// them gets 401.
    pub fn revoke_tokens(&self) {
        let mut farm = self.farm();
        farm.access_tokens.clear();
        farm.refresh_tokens.clear();
    }

    /// Makes every access token handed out so far expired (refresh tokens
    /// still work).
    pub fn expire_access_tokens(&self) {
        let now = Instant::now();
        for grant in self.farm().access_tokens.values_mut() {
            grant.expires = now;
        }
    }

    pub fn counters(&self) -> Counters {
        self.farm().counters.clone()
    }

    pub fn reset_counters(&self) {
        self.farm().counters = Counters::default();
    }

    /// Every access and refresh token handed out so far.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.farm().issued.clone()
    }
}

impl Drop for DispatcherStandin {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A listening socket on 127.0.0.1:`port`, with SO_REUSEADDR so that a
/// restart does not wait for the last connections' TIME_WAIT.
fn listen(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    socket.listen(1024)
}

type Shared = Arc<Mutex<Farm>>;

fn router(shared: Shared) -> Router {
    let api = Router::new()
        .route("/auth/oauth2", post(token))
        .route("/users/{username}/keys", post(add_key_route).get(list_keys));
    Router::new()
        .nest("/api", api)
        .fallback(other)
        .with_state(shared)
}

impl Farm {
    fn count(&mut self, route: &str) {
        *self.counters.requests.entry(route.to_owned()).or_default() += 1;
    }

    fn grant_tokens(&mut self, username: &str) -> Value {
        let access = format!("at-{}", uuid::Uuid::new_v4().simple());
        let refresh = uuid::Uuid::new_v4().to_string();
        self.access_tokens.insert(
            access.clone(),
            AccessGrant {
                username: username.to_owned(),
                expires: Instant::now() + Duration::from_secs(self.expires_in),
            },
        );
        self.refresh_tokens
            .insert(refresh.clone(), username.to_owned());
        self.issued.push(access.clone());
        self.issued.push(refresh.clone());
        json!({
            "access_token": access,
            "token_type": "bearer",
            "expires_in": self.expires_in,
            "refresh_token": refresh,
        })
    }

    /// The user the request's Bearer token was granted to, or the 401 to
    /// answer.
    fn authenticate(&mut self, headers: &HeaderMap) -> Result<String, Refusal> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        let Some(token) = token else {
            return Err(self.unauthorized("token missing"));
        };
        match self.access_tokens.get(token) {
            Some(grant) if Instant::now() < grant.expires => Ok(grant.username.clone()),
            Some(_) => {
                self.access_tokens.remove(token);
                Err(self.unauthorized("token expired"))
            }
            None => Err(self.unauthorized("token invalid")),
        }
    }

    fn unauthorized(&mut self, why: &'static str) -> Refusal {
        self.counters.unauthorized += 1;
        Refusal {
            status: StatusCode::UNAUTHORIZED,
            error: why,
        }
    }
}

/// A request refused by the keys routes: its status and the `error` of the
/// JSON body.
struct Refusal {
    status: StatusCode,
    error: &'static str,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({ "error": self.error }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// An OAuth2 error answer (RFC 6749 §5.2), as the Zimfarm dispatcher
/// shapes it.
fn oauth2_error(farm: &mut Farm, status: StatusCode, error: &str, description: &str) -> Response {
    if status == StatusCode::UNAUTHORIZED {
        farm.counters.unauthorized += 1;
    }
    no_store((
        status,
        Json(json!({ "error": error, "error_description": description })),
    ))
}

fn no_store(response: impl IntoResponse) -> Response {
    let mut response = response.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

async fn token(
    State(shared): State<Shared>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    let mut farm = shared.lock().unwrap();
    let farm = &mut *farm;
    farm.count(TOKEN_ROUTE);
    let Ok(Form(form)) = form else {
        return oauth2_error(
            farm,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The request is not a form.",
        );
    };
    match form.get("grant_type").map(String::as_str) {
        Some("password") => {
            let (Some(username), Some(password)) = (form.get("username"), form.get("password"))
            else {
                return oauth2_error(
                    farm,
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Request was missing the \"username\" or \"password\" parameter.",
                );
            };
            let valid = farm
                .users
                .get(username)
                .is_some_and(|u| &u.password == password);
            if !valid {
                farm.counters.refused_passwords += 1;
                return oauth2_error(
                    farm,
                    StatusCode::UNAUTHORIZED,
                    "invalid_grant",
                    "Username or password is invalid.",
                );
            }
            farm.counters.password_grants += 1;
            no_store(Json(farm.grant_tokens(username)))
        }
        Some("refresh_token") => {
            let Some(refresh) = form.get("refresh_token") else {
                return oauth2_error(
                    farm,
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Request was missing the \"refresh_token\" parameter.",
                );
            };
            // Single use: a refresh token is gone once presented.
            let user = farm
                .refresh_tokens
                .remove(refresh)
                .filter(|u| farm.users.contains_key(u));
            let Some(username) = user else {
                farm.counters.refused_refreshes += 1;
                return oauth2_error(
                    farm,
                    StatusCode::UNAUTHORIZED,
                    "invalid_grant",
                    "Refresh token is invalid.",
                );
            };
            farm.counters.refresh_grants += 1;
            no_store(Json(farm.grant_tokens(&username)))
        }
        other => oauth2_error(
            farm,
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            &format!("{} is not a supported grant type.", other.unwrap_or("None")),
        ),
    }
}

/// The checks both keys routes make: a valid token, for this very user.
fn authorize_user(farm: &mut Farm, headers: &HeaderMap, username: &str) -> Result<(), Refusal> {
    let holder = farm.authenticate(headers)?;
    if !farm.users.contains_key(username) {
        return Err(Refusal {
            status: StatusCode::NOT_FOUND,
            error: "user not found",
        });
    }
    if holder != username {
        return Err(Refusal {
            status: StatusCode::FORBIDDEN,
            error: "you are not allowed to access this resource",
        });
    }
    Ok(())
}

/// Counts a request to `route`, then answers it with `then` on the user
/// `username` if the token is theirs, or with the refusal.
fn with_user(
    shared: &Shared,
    route: &'static str,
    headers: &HeaderMap,
    username: &str,
    then: impl FnOnce(&mut User) -> Response,
) -> Response {
    let mut farm = shared.lock().unwrap();
    let farm = &mut *farm;
    farm.count(route);
    match authorize_user(farm, headers, username) {
        Ok(()) => then(farm.users.get_mut(username).expect("checked")),
        Err(refusal) => refusal.into_response(),
    }
}

async fn list_keys(
    State(shared): State<Shared>,
    Path(username): Path<String>,
    headers: HeaderMap,
) -> Response {
    with_user(&shared, LIST_KEYS_ROUTE, &headers, &username, |user| {
        Json(&user.keys).into_response()
    })
}

async fn add_key_route(
    State(shared): State<Shared>,
    Path(username): Path<String>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    with_user(&shared, ADD_KEY_ROUTE, &headers, &username, |user| {
        let bad = |message: &str| {
            (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
        };
        let Ok(Json(Value::Object(body))) = body else {
            return bad("the body must be a JSON object {\"name\", \"key\"}");
        };
        if let Some(extra) = body.keys().find(|k| *k != "name" && *k != "key") {
            return bad(&format!(
                "Additional properties are not allowed ('{extra}' was unexpected)"
            ));
        }
        let text = |field: &str| {
            body.get(field)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let (Some(name), Some(key)) = (text("name"), text("key")) else {
            return bad("'name' and 'key' are required non-empty strings");
        };
        match add_key(user, &name, &key) {
            Ok(_) => StatusCode::CREATED.into_response(),
            Err(message) => bad(&message),
        }
    })
}

async fn other(State(shared): State<Shared>) -> Response {
    shared.lock().unwrap().count(OTHER_ROUTE);
    (StatusCode::NOT_FOUND, Json(json!({ "error": "not found" }))).into_response()
}

/// Adds a key to `user` after the dispatcher's checks: a valid base64
/// public key blob (a whole `type blob comment` line is cut down to the
/// blob) that is not registered yet.
fn add_key(user: &mut User, name: &str, key: &str) -> Result<StoredKey, String> {
    let parts: Vec<&str> = key.split_whitespace().collect();
    let blob_b64 = match parts.as_slice() {
        [blob] => *blob,
        [_, blob, ..] => *blob,
        [] => return Err("empty key".to_owned()),
    };
    let blob = data_encoding::BASE64
        .decode(blob_b64.as_bytes())
        .map_err(|_| "Invalid key: not base64".to_owned())?;
    let algorithm = key_algorithm(&blob).ok_or("Invalid key: not an SSH public key blob")?;
    let fingerprint = md5_hex(&blob);
    if user.keys.iter().any(|k| k.fingerprint == fingerprint) {
        return Err("SSH key already exists".to_owned());
    }
    let key_type = match algorithm.as_str() {
        "ssh-rsa" => "RSA".to_owned(),
        "ssh-ed25519" => "ED25519".to_owned(),
        a if a.starts_with("ecdsa-sha2-") => "ECDSA".to_owned(),
        a => a.to_ascii_uppercase(),
    };
    let stored = StoredKey {
        name: name.to_owned(),
        fingerprint,
        key: blob_b64.to_owned(),
        key_type,
        added: chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        last_used: None,
    };
    user.keys.push(stored.clone());
    Ok(stored)
}

/// The algorithm name a public key blob starts with (an SSH string: a
/// big-endian u32 length, then the name).
fn key_algorithm(blob: &[u8]) -> Option<String> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    let name = blob.get(4..4 + len)?;
    if name.is_empty() || blob.len() <= 4 + len {
        return None;
    }
    std::str::from_utf8(name)
        .ok()
        .filter(|n| n.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
}

/// MD5, lowercase hex without colons.
pub fn md5_hex(bytes: &[u8]) -> String {
    format!("{:x}", <md5::Md5 as md5::Digest>::digest(bytes))
}
