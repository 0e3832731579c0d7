//! The HTTP listener turned on by `METRICS_ADDR`: `GET /metrics`
//! (Prometheus / OpenMetrics text) and `GET /healthz` (the health verdict
//! as JSON, 200 or 503), and the client side of `/healthz` that the
//! `healthcheck` command (the Docker image's HEALTHCHECK) uses.
//!
//! It only reads [`crate::metrics`]; it must not change the worker's state.
//! It serves nothing else and reads no request body.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::{self, Health};

/// The content type of `/metrics`.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(
        "METRICS_ADDR: cannot listen on {addr}: {source}; choose a free port, or unset METRICS_ADDR to turn the listener off"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot reach the health endpoint {url}: {reason}; is the worker running with METRICS_ADDR set?"
    )]
    Unreachable { url: String, reason: String },
    #[error(
        "the health endpoint {url} answered {status} with a body that is not a health report: {body}"
    )]
    BadReply {
        url: String,
        status: u16,
        body: String,
    },
}

/// Binds the listener (at start, so a port in use stops the worker with a
/// clear line instead of failing later).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MonitorError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MonitorError::Bind { addr, source })
}

fn router() -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .route("/", get(index))
}

/// Serves until `shutdown` fires.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics and /healthz");
    }
    let result = axum::serve(listener, router())
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(error) = result {
        tracing::error!(%error, "the metrics listener stopped");
    }
}

async fn metrics_page() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        metrics::global().encode(),
    )
}

async fn healthz() -> impl IntoResponse {
    let health = metrics::global().health();
    let status = if health.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::to_string(&health).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], body)
}

async fn index() -> &'static str {
    "zimfarm-worker: GET /metrics (Prometheus), GET /healthz (health)\n"
}

/// Where a client reaches a listener bound to `addr`: the loopback address
/// of its family when it listens on every address.
pub fn reach(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// Asks a worker's `/healthz` (the `healthcheck` command).
pub async fn probe(addr: SocketAddr) -> Result<Health, MonitorError> {
    let url = format!("http://{}/healthz", reach(addr));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .map_err(|e| MonitorError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        })?;
    let reply = client
        .get(&url)
        .send()
        .await
        .map_err(|e| MonitorError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        })?;
    let status = reply.status().as_u16();
    let body = reply.text().await.unwrap_or_default();
    serde_json::from_str::<Health>(&body).map_err(|_| MonitorError::BadReply {
        url,
        status,
        body: body.chars().take(200).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_addresses_are_reached_on_loopback() {
        assert_eq!(
            reach("0.0.0.0:9090".parse().unwrap()),
            "127.0.0.1:9090".parse().unwrap()
        );
        assert_eq!(
            reach("[::]:9090".parse().unwrap()),
            "[::1]:9090".parse().unwrap()
        );
        assert_eq!(
            reach("10.1.2.3:80".parse().unwrap()),
            "10.1.2.3:80".parse().unwrap()
        );
    }

    #[tokio::test]
    async fn serves_metrics_and_health_and_probe_reads_it() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, stop.clone()));
        let health = probe(addr).await.unwrap();
        assert_eq!(health, metrics::global().health());
        let page = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap();
        assert_eq!(
            page.headers()[reqwest::header::CONTENT_TYPE],
            METRICS_CONTENT_TYPE
        );
        assert!(page.text().await.unwrap().contains("zimfarm_worker_"));
        let missing = reqwest::get(format!("http://{addr}/nope")).await.unwrap();
        assert_eq!(missing.status(), 404);
        stop.cancel();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn bind_and_probe_failures_say_what_to_do() {
        let taken = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind(addr).await.unwrap_err().to_string();
        assert!(
            err.contains("METRICS_ADDR") && err.contains("free port"),
            "{err}"
        );
        drop(taken);
        let err = probe(addr).await.unwrap_err().to_string();
        assert!(err.contains("METRICS_ADDR"), "{err}");
    }
}
