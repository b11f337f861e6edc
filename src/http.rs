//! HTTP endpoints: the aggregated status (JSON and a live event stream),
//! metrics, health, the dashboard and a Prefetch's drill-down. The status
//! is read from the StatusActor; a drill-down is asked of the Prefetch's
//! own actor, through its ClusterActor. Nothing here talks to a cluster.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use actix::Addr;
use actix_web::{App, HttpResponse, HttpServer, dev::Server, get, web};

use tracing::warn;

use crate::actors::cluster::{GridError, PrefetchNodes};
use crate::actors::status::{GetStatus, STANDBY, StatusActor, StatusView};
use crate::actors::supervisor::ClusterRegistry;
use crate::metrics::Metrics;
use crate::pull::grid::GridQuery;

#[derive(Clone)]
struct AppState {
    status: Addr<StatusActor>,
    metrics: Metrics,
    clusters: ClusterRegistry,
}

/// Binds the listener now (so a taken port fails start-up with a clear error)
/// and returns the server to be awaited or spawned.
pub fn serve(
    listen: SocketAddr,
    status: Addr<StatusActor>,
    metrics: Metrics,
    clusters: ClusterRegistry,
) -> std::io::Result<Server> {
    let state = AppState {
        status,
        metrics,
        clusters,
    };
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(state.clone()))
            .service(status_json)
            .service(prefetch_nodes)
            .service(healthz)
            .service(readyz)
            .service(metrics_text)
            .service(dashboard)
            .service(dashboard_js)
            .service(dashboard_css)
            .service(events)
    })
    .workers(1)
    // Event streams never end by themselves: stopping must not wait 30 s
    // (the default) for an open dashboard.
    .shutdown_timeout(1)
    .disable_signals()
    .bind(listen)
    .map_err(|error| {
        std::io::Error::new(error.kind(), format!("cannot listen on {listen}: {error}"))
    })?
    .run();
    Ok(server)
}

async fn snapshot(state: &AppState) -> Result<StatusView, HttpResponse> {
    state.status.send(GetStatus).await.map_err(|error| {
        HttpResponse::ServiceUnavailable().body(format!("status actor unavailable: {error}\n"))
    })
}

#[get("/api/v1/status")]
async fn status_json(state: web::Data<AppState>) -> HttpResponse {
    match snapshot(&state).await {
        Ok(view) => HttpResponse::Ok().json(view),
        Err(response) => response,
    }
}

/// `{"error": "..."}` with `status`.
fn json_error(status: actix_web::http::StatusCode, error: &str) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({ "error": error }))
}

#[derive(serde::Deserialize)]
struct NodesQuery {
    /// Part of a node name or image, case-insensitive.
    q: Option<String>,
    limit: Option<usize>,
}

/// A Prefetch's drill-down: every node of its cluster with its pairs'
/// states, or the reason it is skipped (see `crate::pull::grid`).
#[get("/api/v1/clusters/{cluster}/prefetches/{namespace}/{name}/nodes")]
async fn prefetch_nodes(
    state: web::Data<AppState>,
    path: web::Path<(String, String, String)>,
    query: Result<web::Query<NodesQuery>, actix_web::Error>,
) -> HttpResponse {
    use actix_web::http::StatusCode;
    let (cluster, namespace, name) = path.into_inner();
    let query = match query {
        Ok(query) => query.into_inner(),
        Err(error) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("{error}; use q=TEXT and limit=NUMBER"),
            );
        }
    };
    let Some(addr) = state.clusters.get(&cluster) else {
        // Not running: a standby runs none, a crashed one waits to restart.
        let (status, error) = match snapshot(&state).await {
            Ok(view) if view.standby => (StatusCode::SERVICE_UNAVAILABLE, STANDBY.to_string()),
            Ok(view) => match view.clusters.iter().find(|c| c.name == cluster) {
                Some(known) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "cluster {cluster} is not running ({})",
                        known.health.label()
                    ),
                ),
                None => (StatusCode::NOT_FOUND, format!("no cluster {cluster}")),
            },
            Err(_) => (StatusCode::NOT_FOUND, format!("no cluster {cluster}")),
        };
        return json_error(status, &error);
    };
    let request = PrefetchNodes {
        namespace,
        name,
        query: GridQuery::new(query.q.as_deref(), query.limit),
    };
    match addr.send(request).await {
        Ok(Ok(grid)) => HttpResponse::Ok().json(grid),
        Ok(Err(GridError::NotFound(error))) => json_error(StatusCode::NOT_FOUND, &error),
        Ok(Err(GridError::Unavailable(error))) => {
            json_error(StatusCode::SERVICE_UNAVAILABLE, &error)
        }
        // Its Arbiter stopped between the look-up and the answer.
        Err(error) => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cluster {cluster} did not answer: {error}"),
        ),
    }
}

/// Liveness: "ok", then a line per cluster that crashed (now or before).
/// A crashed cluster does not fail it: the supervisor restarts that
/// cluster, and restarting the process would stop the others too.
#[get("/healthz")]
async fn healthz(state: web::Data<AppState>) -> HttpResponse {
    match snapshot(&state).await {
        Ok(view) => {
            let mut body = String::from("ok\n");
            for line in view.health_details() {
                body.push_str(&line);
                body.push('\n');
            }
            HttpResponse::Ok().body(body)
        }
        Err(response) => response,
    }
}

/// Ready once every configured cluster has been tried at least once; an
/// unreachable cluster does not make the process unready (the others work).
#[get("/readyz")]
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    match snapshot(&state).await {
        Ok(view) if view.all_clusters_reported() => HttpResponse::Ok().body("ready\n"),
        Ok(view) if view.standby => HttpResponse::ServiceUnavailable().body(format!("{STANDBY}\n")),
        Ok(_) => HttpResponse::ServiceUnavailable().body("connecting to clusters\n"),
        Err(response) => response,
    }
}

#[get("/metrics")]
async fn metrics_text(state: web::Data<AppState>) -> HttpResponse {
    let view = match snapshot(&state).await {
        Ok(view) => view,
        Err(response) => return response,
    };
    match state.metrics.render(&view) {
        Ok(body) => HttpResponse::Ok()
            .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
            .body(body),
        Err(error) => HttpResponse::InternalServerError().body(format!("{error}\n")),
    }
}

/// The dashboard: static files compiled into the binary (no build step, no
/// Node toolchain); the page renders what `/api/v1/events` streams.
const DASHBOARD_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/dashboard.css");

/// Only our own files: nothing inline, nothing from elsewhere.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; frame-ancestors 'none'";

fn asset(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("Content-Security-Policy", CONTENT_SECURITY_POLICY))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .body(body)
}

#[get("/")]
async fn dashboard() -> HttpResponse {
    asset("text/html; charset=utf-8", DASHBOARD_HTML)
}

#[get("/assets/dashboard.js")]
async fn dashboard_js() -> HttpResponse {
    asset("text/javascript; charset=utf-8", DASHBOARD_JS)
}

#[get("/assets/dashboard.css")]
async fn dashboard_css() -> HttpResponse {
    asset("text/css; charset=utf-8", DASHBOARD_CSS)
}

/// How often a stream compares the status with what it last sent. The
/// status actor has no change notification, and a local message is cheap.
const EVENTS_POLL: Duration = Duration::from_millis(500);
/// A comment line this often keeps proxies from closing an idle stream.
const EVENTS_KEEP_ALIVE: Duration = Duration::from_secs(15);
/// What the browser's EventSource waits before reconnecting, in ms.
const EVENTS_RETRY_MS: u64 = 2000;

/// One server-sent event: `event: NAME`, one `data:` line per line of
/// `data`, and the blank line that ends it.
pub fn sse_event(name: &str, data: &str) -> String {
    let mut frame = format!("event: {name}\n");
    for line in data.lines() {
        frame.push_str("data: ");
        frame.push_str(line);
        frame.push('\n');
    }
    frame.push('\n');
    frame
}

struct EventStream {
    status: Addr<StatusActor>,
    last_sent: Option<String>,
    last_write: Instant,
    first: bool,
}

/// `GET /api/v1/events`: a `status` event with the whole `/api/v1/status`
/// document at once and each time it changes (server-sent events).
#[get("/api/v1/events")]
async fn events(state: web::Data<AppState>) -> HttpResponse {
    let start = EventStream {
        status: state.status.clone(),
        last_sent: None,
        last_write: Instant::now(),
        first: true,
    };
    let stream = futures::stream::unfold(start, |mut stream| async move {
        if stream.first {
            stream.first = false;
            let retry = format!("retry: {EVENTS_RETRY_MS}\n\n");
            return Some((Ok::<_, actix_web::Error>(web::Bytes::from(retry)), stream));
        }
        loop {
            if stream.last_sent.is_some() {
                tokio::time::sleep(EVENTS_POLL).await;
            }
            // The actor is gone only when the process stops: end the stream.
            let view = stream.status.send(GetStatus).await.ok()?;
            let json = match serde_json::to_string(&view) {
                Ok(json) => json,
                Err(error) => {
                    warn!(%error, "cannot serialize the status for /api/v1/events");
                    return None;
                }
            };
            if stream.last_sent.as_ref() != Some(&json) {
                let frame = sse_event("status", &json);
                stream.last_sent = Some(json);
                stream.last_write = Instant::now();
                return Some((Ok(web::Bytes::from(frame)), stream));
            }
            if stream.last_write.elapsed() >= EVENTS_KEEP_ALIVE {
                stream.last_write = Instant::now();
                return Some((Ok(web::Bytes::from_static(b": keep-alive\n\n")), stream));
            }
        }
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        // Tells nginx-like proxies not to buffer the stream.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_event_frames_every_line_and_ends_with_a_blank_line() {
        assert_eq!(
            sse_event("status", r#"{"clusters":[]}"#),
            "event: status\ndata: {\"clusters\":[]}\n\n"
        );
        assert_eq!(
            sse_event("status", "a\nb"),
            "event: status\ndata: a\ndata: b\n\n"
        );
    }

    /// An unknown cluster is a JSON 404, found by its decoded name: a
    /// kubeconfig context may hold "/" and ":" (EKS: arn:aws:eks:...:cluster/NAME).
    #[actix_web::test]
    async fn an_unknown_cluster_is_a_json_404_by_its_decoded_name() {
        use actix::Actor;
        let state = AppState {
            status: StatusActor::default().start(),
            metrics: Metrics::default(),
            clusters: ClusterRegistry::default(),
        };
        let app = actix_web::test::init_service(
            App::new()
                .app_data(web::Data::new(state))
                .service(prefetch_nodes),
        )
        .await;
        let request = actix_web::test::TestRequest::get()
            .uri("/api/v1/clusters/arn%3Aaws%3Aeks%3Aeu%2Fprod/prefetches/team/warm/nodes")
            .to_request();
        let response = actix_web::test::call_service(&app, request).await;
        assert_eq!(response.status(), 404);
        let body: serde_json::Value = actix_web::test::read_body_json(response).await;
        assert_eq!(body["error"], "no cluster arn:aws:eks:eu/prod");

        let request = actix_web::test::TestRequest::get()
            .uri("/api/v1/clusters/a/prefetches/team/warm/nodes?limit=many")
            .to_request();
        let response = actix_web::test::call_service(&app, request).await;
        assert_eq!(response.status(), 400);
        let body: serde_json::Value = actix_web::test::read_body_json(response).await;
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains("limit")),
            "{body}"
        );
    }

    #[test]
    fn dashboard_uses_only_embedded_assets_and_no_reload() {
        assert!(DASHBOARD_HTML.contains(r#"src="/assets/dashboard.js""#));
        assert!(DASHBOARD_HTML.contains(r#"href="/assets/dashboard.css""#));
        assert!(!DASHBOARD_HTML.contains("http-equiv=\"refresh\""));
        assert!(DASHBOARD_JS.contains(r#"new EventSource("/api/v1/events")"#));
        // Inline scripts would be refused by the page's own CSP.
        assert!(!DASHBOARD_HTML.contains("<script>"));
    }
}
