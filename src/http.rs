//! HTTP endpoints: the aggregated status (JSON), metrics, health and a small
//! dashboard. Everything is read from the StatusActor; nothing here talks to
//! a cluster.

use std::fmt::Write as _;
use std::net::SocketAddr;

use actix::Addr;
use actix_web::{App, HttpResponse, HttpServer, dev::Server, get, web};

use crate::actors::status::{ClusterHealth, GetStatus, StatusActor, StatusView};
use crate::metrics::Metrics;

#[derive(Clone)]
struct AppState {
    status: Addr<StatusActor>,
    metrics: Metrics,
}

/// Binds the listener now (so a taken port fails start-up with a clear error)
/// and returns the server to be awaited or spawned.
pub fn serve(
    listen: SocketAddr,
    status: Addr<StatusActor>,
    metrics: Metrics,
) -> std::io::Result<Server> {
    let state = AppState { status, metrics };
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(state.clone()))
            .service(status_json)
            .service(healthz)
            .service(readyz)
            .service(metrics_text)
            .service(dashboard)
    })
    .workers(1)
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

#[get("/healthz")]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().body("ok\n")
}

/// Ready once every configured cluster has been tried at least once; an
/// unreachable cluster does not make the process unready (the others work).
#[get("/readyz")]
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    match snapshot(&state).await {
        Ok(view) if view.all_clusters_reported() => HttpResponse::Ok().body("ready\n"),
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

#[get("/")]
async fn dashboard(state: web::Data<AppState>) -> HttpResponse {
    match snapshot(&state).await {
        Ok(view) => HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .body(render_dashboard(&view)),
        Err(response) => response,
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn health_detail(health: &ClusterHealth) -> String {
    match health {
        ClusterHealth::Connecting => String::new(),
        ClusterHealth::Connected { version } => version.clone(),
        ClusterHealth::Unreachable { reason } | ClusterHealth::CrdMissing { reason } => {
            reason.clone()
        }
        ClusterHealth::Forbidden { what } => what.clone(),
    }
}

fn render_dashboard(view: &StatusView) -> String {
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\">\
         <title>kube-prefetch</title><style>body{font-family:sans-serif;margin:2em}\
         table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}\
         .READY{color:green}.FAILED{color:#b00}.RUNNING{color:#06c}</style></head><body>\
         <h1>kube-prefetch</h1><table><tr><th>Cluster</th><th>State</th><th>Namespace</th>\
         <th>Prefetch</th><th>Phase</th><th>Nodes</th><th>Ready</th><th>In flight</th>\
         <th>Failed</th><th>Total</th><th>Message</th></tr>",
    );
    for cluster in &view.clusters {
        let state = format!(
            "{} {}",
            cluster.health.label(),
            escape(&health_detail(&cluster.health))
        );
        if cluster.prefetches.is_empty() {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td colspan=\"9\"></td></tr>",
                escape(&cluster.name),
                state
            );
        }
        for prefetch in &cluster.prefetches {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{phase}\">{phase}</td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&cluster.name),
                state,
                escape(&prefetch.namespace),
                escape(&prefetch.name),
                prefetch.nodes,
                prefetch.pulls.ready,
                prefetch.pulls.in_flight,
                prefetch.pulls.failed,
                prefetch.pulls.total,
                escape(prefetch.message.as_deref().unwrap_or("")),
                phase = prefetch.phase,
            );
        }
    }
    html.push_str("</table></body></html>\n");
    html
}
