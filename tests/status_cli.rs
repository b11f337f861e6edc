//! `kube-prefetch status` against a running kube-prefetch on the sim
//! clusters: the JSON is the status API's document, the table and wide forms
//! have their exact columns, and the exit code says what is wrong.

mod harness;
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use harness::*;
use kube_prefetch::actors::status::StatusView;
use kube_prefetch::api::{Phase, Prefetch};
use serde_json::json;

const PHASE_TIMEOUT: Duration = Duration::from_secs(90);

const TABLE_HEADERS: [&str; 9] = [
    "CLUSTER",
    "STATE",
    "PREFETCH",
    "PHASE",
    "NODES",
    "READY",
    "IN-FLIGHT",
    "FAILED",
    "TOTAL",
];

const WIDE_HEADERS: [&str; 12] = [
    "CLUSTER",
    "STATE",
    "VERSION",
    "PREFETCH",
    "PHASE",
    "NODES",
    "IMAGES",
    "READY",
    "IN-FLIGHT",
    "FAILED",
    "TOTAL",
    "MESSAGE",
];

/// Runs `kube-prefetch status` with `args` as a script would (stdout a pipe).
async fn status_command(url: &str, args: &[&str]) -> Result<Output> {
    let mut command = Command::new(binary());
    command.args(["status", "--url", url]).args(args);
    tokio::task::spawn_blocking(move || command.output().context("running kube-prefetch status"))
        .await?
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The line of `table` whose PREFETCH column is `prefetch`.
fn row_of<'a>(table: &'a str, prefetch: &str) -> Result<&'a str> {
    table
        .lines()
        .find(|line| line.split_whitespace().any(|cell| cell == prefetch))
        .with_context(|| format!("no row for {prefetch} in:\n{table}"))
}

/// Each column starts where its header starts: the table is aligned.
fn assert_aligned(header: &str, row: &str, cells: &[&str]) {
    let mut header_from = 0;
    let mut row_from = 0;
    for (name, cell) in header.split_whitespace().zip(cells) {
        let header_at = header[header_from..].find(name).map(|at| at + header_from);
        let row_at = row[row_from..].find(cell).map(|at| at + row_from);
        assert_eq!(
            header_at, row_at,
            "column {name} ({cell}) is not aligned:\n{header}\n{row}"
        );
        header_from = header_at.unwrap_or(0) + name.len();
        row_from = row_at.unwrap_or(0) + cell.len();
    }
}

/// `status -o json` (and the old `--json`) print the status API's JSON
/// value; `-o table` and `-o wide` show the Prefetch with their exact
/// columns; everything Connected and READY exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_output_matches_the_api_in_every_format() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[0].clone();
    let ns = support::TestNamespace::create(&cluster, "status-cli").await?;
    apply(
        &ns.api::<Prefetch>(),
        prefetch_json(
            "warm",
            json!({ "images": ["busybox:1.36"], "node_filter": "worker" }),
        ),
    )
    .await?;
    let orchestrator = Orchestrator::start("status-cli", Options::default()).await?;
    let client = ns.client();
    wait_phase(&client, ns.name(), "warm", Phase::Ready, PHASE_TIMEOUT).await?;
    let workers = workers(&cluster).len().to_string();
    let url = orchestrator.url();
    let qualified = format!("{}/warm", ns.name());

    // The status may move between two reads (another cluster reconnecting):
    // the CLI's answer must equal the API's when the API is the same before
    // and after it.
    for args in [&["-o", "json"][..], &["--json"][..]] {
        let mut compared = false;
        for _ in 0..10 {
            let before: serde_json::Value =
                serde_json::from_str(&orchestrator.get("/api/v1/status").await?)?;
            let output = status_command(&url, args).await?;
            let after: serde_json::Value =
                serde_json::from_str(&orchestrator.get("/api/v1/status").await?)?;
            if before != after {
                continue;
            }
            assert_eq!(output.status.code(), Some(0), "{args:?}: {output:?}");
            let printed: serde_json::Value = serde_json::from_str(&stdout(&output))
                .with_context(|| format!("{args:?} printed no JSON: {output:?}"))?;
            assert_eq!(printed, after, "{args:?}");
            compared = true;
            break;
        }
        assert!(compared, "the status API never stood still for {args:?}");
    }

    let view: StatusView = orchestrator.status().await?;
    let version = match &view
        .clusters
        .iter()
        .find(|c| c.name == cluster)
        .context("cluster in the status")?
        .health
    {
        kube_prefetch::actors::status::ClusterHealth::Connected { version } => version.clone(),
        other => anyhow::bail!("{cluster} is {other:?}"),
    };

    let output = status_command(&url, &["-o", "table"]).await?;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let table = stdout(&output);
    assert!(!table.contains('\x1b'), "colour codes in a pipe:\n{table}");
    let header = table.lines().next().context("empty table")?;
    assert_eq!(header.split_whitespace().collect::<Vec<_>>(), TABLE_HEADERS);
    let row = row_of(&table, &qualified)?;
    let cells = [
        cluster.as_str(),
        "Connected",
        qualified.as_str(),
        "READY",
        workers.as_str(),
        workers.as_str(),
        "0",
        "0",
        workers.as_str(),
    ];
    assert_eq!(row.split_whitespace().collect::<Vec<_>>(), cells, "{table}");
    assert_aligned(header, row, &cells);
    // No option means the table.
    let default = status_command(&url, &[]).await?;
    assert_eq!(stdout(&default).lines().next(), Some(header), "{default:?}");

    let output = status_command(&url, &["-o", "wide"]).await?;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let wide = stdout(&output);
    let header = wide.lines().next().context("empty wide table")?;
    assert_eq!(header.split_whitespace().collect::<Vec<_>>(), WIDE_HEADERS);
    let row = row_of(&wide, &qualified)?;
    let cells = [
        cluster.as_str(),
        "Connected",
        version.as_str(),
        qualified.as_str(),
        "READY",
        workers.as_str(),
        "1",
        workers.as_str(),
        "0",
        "0",
        workers.as_str(),
    ];
    // A READY Prefetch has no message: the row ends at TOTAL.
    assert_eq!(row.split_whitespace().collect::<Vec<_>>(), cells, "{wide}");
    assert_aligned(header, row, &cells);

    drop(orchestrator);
    ns.cleanup().await?;
    Ok(())
}

/// A FAILED Prefetch makes `status` exit 4 (every format), a cluster that
/// is not Connected makes it exit 3, and no instance at all exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_exit_code_follows_failed_prefetches_and_cluster_states() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[0].clone();
    let ns = support::TestNamespace::create(&cluster, "status-exit").await?;
    apply(
        &ns.api::<Prefetch>(),
        prefetch_json(
            "broken",
            json!({ "images": ["fail.invalid/status:1"], "node_filter": "worker" }),
        ),
    )
    .await?;
    let orchestrator = Orchestrator::start(
        "status-exit",
        Options {
            max_attempts: 1,
            ..Options::default()
        },
    )
    .await?;
    let qualified = format!("{}/broken", ns.name());
    support::wait_for(
        "the status API to show the Prefetch FAILED",
        PHASE_TIMEOUT,
        || {
            let orchestrator = &orchestrator;
            let qualified = qualified.clone();
            async move {
                let view = orchestrator.status().await?;
                Ok(view
                    .clusters
                    .iter()
                    .flat_map(|c| &c.prefetches)
                    .any(|p| {
                        format!("{}/{}", p.namespace, p.name) == qualified
                            && p.phase == Phase::Failed
                    })
                    .then_some(()))
            }
        },
    )
    .await?;
    for format in ["table", "wide", "json"] {
        let output = status_command(&orchestrator.url(), &["-o", format]).await?;
        assert_eq!(output.status.code(), Some(4), "-o {format}: {output:?}");
        if format != "json" {
            let table = stdout(&output);
            let row = row_of(&table, &qualified)?;
            assert!(
                row.split_whitespace()
                    .nth(if format == "wide" { 4 } else { 3 })
                    == Some("FAILED"),
                "{table}"
            );
        }
    }
    drop(orchestrator);
    ns.cleanup().await?;

    // One cluster behind a port nothing listens on: Unreachable, exit 3.
    let dir = tempfile::tempdir()?;
    let dead = closed_port_kubeconfig(dir.path(), &cluster, "dead")?.path;
    let kubeconfig_toml = format!(
        "[[kubeconfig]]\npath = {:?}\ncontexts = [{cluster:?}]\n\n[[kubeconfig]]\npath = {:?}\n",
        support::kubeconfig_path().display().to_string(),
        dead.display().to_string()
    );
    let orchestrator = Orchestrator::start(
        "status-unreachable",
        Options {
            kubeconfig_toml: Some(kubeconfig_toml),
            ..Options::default()
        },
    )
    .await?;
    support::wait_for("dead Unreachable", Duration::from_secs(30), || {
        let orchestrator = &orchestrator;
        let cluster = cluster.clone();
        async move {
            let view = orchestrator.status().await?;
            Ok(
                (cluster_state(&view, "dead").as_deref() == Some("Unreachable")
                    && is_connected(&view, &cluster))
                .then_some(()),
            )
        }
    })
    .await?;
    let output = status_command(&orchestrator.url(), &[]).await?;
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    let table = stdout(&output);
    let dead_row = table
        .lines()
        .find(|line| line.starts_with("dead "))
        .with_context(|| format!("no row for the dead cluster:\n{table}"))?;
    assert_eq!(
        dead_row.split_whitespace().collect::<Vec<_>>(),
        ["dead", "Unreachable", "-"],
        "{table}"
    );
    assert!(
        table.lines().any(|line| line.starts_with("dead: ")),
        "the reason is printed under the table:\n{table}"
    );
    let port = orchestrator.port;
    drop(orchestrator);

    // Nothing listening: exit 1 and the endpoint named.
    let output = status_command(&format!("http://127.0.0.1:{port}"), &[]).await?;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("http://127.0.0.1:{port}/api/v1/status")),
        "{stderr}"
    );
    Ok(())
}

/// `status --watch` into a pipe appends one JSON document per refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_appends_json_lines_when_not_on_a_terminal() -> Result<()> {
    let _serial = setup().await;
    let orchestrator = Orchestrator::start("status-watch", Options::default()).await?;
    let expected_clusters = support::cluster_names();
    let mut child = Command::new(binary())
        .args(["status", "--url", &orchestrator.url()])
        .args(["--watch", "--interval", "1", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting status --watch")?;
    let pipe = child.stdout.take().context("stdout pipe")?;
    let lines = tokio::task::spawn_blocking(move || {
        BufReader::new(pipe)
            .lines()
            .take(3)
            .collect::<std::io::Result<Vec<String>>>()
    });
    let lines = tokio::time::timeout(Duration::from_secs(20), lines).await;
    let _ = child.kill();
    let _ = child.wait();
    let lines = lines.context("3 refreshes did not come within 20 s")???;
    assert_eq!(lines.len(), 3);
    for line in &lines {
        let view: StatusView =
            serde_json::from_str(line).with_context(|| format!("not a status document: {line}"))?;
        let names: Vec<String> = view.clusters.iter().map(|c| c.name.clone()).collect();
        assert_eq!(names, expected_clusters, "{line}");
    }
    Ok(())
}

/// Runs `kube-prefetch status ARGS` on a pseudo-terminal (util-linux
/// `script`), for `duration` at most, and returns what it wrote there.
fn on_a_terminal(args: &str, no_color: bool, duration: Duration) -> Result<String> {
    let command_line = format!("{} status {args}", binary().display());
    let mut command = Command::new("timeout");
    command
        .arg(format!("{}", duration.as_secs()))
        .args([
            "script",
            "--quiet",
            "--return",
            "--command",
            &command_line,
            "/dev/null",
        ])
        .env_remove("NO_COLOR")
        .stdin(Stdio::null());
    if no_color {
        command.env("NO_COLOR", "1");
    }
    let output = command.output().context("running script(1)")?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// On a terminal: colours unless NO_COLOR is set, and `--watch` redraws in
/// place (home and clear before each frame).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_on_a_terminal_is_coloured_and_watch_redraws() -> Result<()> {
    let _serial = setup().await;
    let orchestrator = Orchestrator::start("status-terminal", Options::default()).await?;
    let url = orchestrator.url();
    let coloured = tokio::task::block_in_place(|| {
        on_a_terminal(&format!("--url {url}"), false, Duration::from_secs(20))
    })?;
    assert!(
        coloured.contains("\x1b[32mConnected\x1b[0m"),
        "no colour on a terminal: {coloured:?}"
    );
    let plain = tokio::task::block_in_place(|| {
        on_a_terminal(&format!("--url {url}"), true, Duration::from_secs(20))
    })?;
    assert!(plain.contains("Connected"), "{plain:?}");
    assert!(
        !plain.contains('\x1b'),
        "colour despite NO_COLOR: {plain:?}"
    );

    let watched = tokio::task::block_in_place(|| {
        on_a_terminal(
            &format!("--url {url} --watch --interval 1"),
            true,
            Duration::from_secs(4),
        )
    })?;
    let redraws = watched.matches("\x1b[H\x1b[2J").count();
    assert!(redraws >= 2, "{redraws} redraws in 4 s: {watched:?}");
    Ok(())
}
