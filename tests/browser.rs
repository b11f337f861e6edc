//! The dashboard in a real browser: Debian's headless chromium, driven
//! through chromedriver (WebDriver), against kube-prefetch on the sim
//! clusters. What a person would check by looking: every cluster listed, a
//! Prefetch moving to READY without a reload, a failure with its reason, a
//! Prefetch's drill-down (opened from the keyboard) showing its nodes ×
//! images grid and a skipped node with its reason, a stopped API server
//! shown Unreachable and then Connected again. Screenshots of the list and
//! the drill-down at laptop and phone widths go to `target/screenshots/`
//! (with `UPDATE_SCREENSHOTS=1`, to `docs/screenshots/`, which the README
//! shows).
//!
//! `make test` installs chromium first (`deploy/install-browser.sh`).

mod harness;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use fantoccini::{Client, ClientBuilder, Locator};
use harness::*;
use kube_prefetch::api::Prefetch;
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const LAPTOP: (u32, u32) = (1280, 800);
const PHONE: (u32, u32) = (390, 844);

/// chromedriver on a free loopback port, stopped on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    async fn start() -> Result<Driver> {
        for tool in [CHROMIUM, CHROMEDRIVER] {
            ensure!(
                Path::new(tool).exists(),
                "{tool} is missing: run deploy/install-browser.sh (make test does)"
            );
        }
        let port = free_port()?;
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver")?;
        let driver = Driver { child, port };
        support::wait_for(
            "chromedriver to answer",
            Duration::from_secs(20),
            || async {
                Ok(ureq::get(&format!("http://127.0.0.1:{port}/status"))
                    .call()
                    .is_ok()
                    .then_some(()))
            },
        )
        .await?;
        Ok(driver)
    }

    async fn browser(&self) -> Result<Client> {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                // Root in a container: no sandbox; no GPU; /dev/shm is small.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .context("opening a chromium session through chromedriver")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `script` in the page and returns its value.
async fn page_eval(browser: &Client, script: &str) -> Result<Value> {
    browser
        .execute(script, Vec::new())
        .await
        .with_context(|| format!("running in the page: {script}"))
}

/// Polls `script` until it returns something other than null/false.
async fn wait_page(browser: &Client, what: &str, timeout: Duration, script: &str) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let value = page_eval(browser, script).await?;
        if !value.is_null() && value != Value::Bool(false) {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            let page =
                page_eval(browser, "return document.querySelector('main').innerText").await?;
            bail!("timed out after {timeout:?} waiting for {what}; the page shows:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A script returning the text of cluster `cluster`'s row once it contains
/// every one of `needles`, else null.
fn cluster_row(cluster: &str, needles: &[&str]) -> String {
    format!(
        "const row = [...document.querySelectorAll('#clusters tbody tr')].find(r => r.cells[0].textContent === {cluster:?}); return row && {needles:?}.every(n => row.innerText.includes(n)) ? row.innerText : null;"
    )
}

/// The same for the Prefetch row `cluster/namespace/name`.
fn prefetch_row(key: &str, needles: &[&str]) -> String {
    format!(
        "const row = document.querySelector('#prefetches tbody tr[data-key={key:?}]'); return row && {needles:?}.every(n => row.textContent.includes(n)) ? row.textContent : null;"
    )
}

async fn screenshot(browser: &Client, (width, height): (u32, u32), name: &str) -> Result<PathBuf> {
    browser.set_window_size(width, height).await?;
    // Let the layout settle at the new width.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let png = browser.screenshot().await?;
    let dir = if std::env::var_os("UPDATE_SCREENSHOTS").is_some() {
        support::repo_root().join("docs/screenshots")
    } else {
        support::repo_root().join("target/screenshots")
    };
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.png"));
    std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_chromium_follows_the_clusters_live() -> Result<()> {
    let _serial = setup().await;
    let clusters = support::cluster_names();
    ensure!(clusters.len() >= 3, "the sim runs 3 clusters: {clusters:?}");
    let ns = support::TestNamespace::create(&clusters[0], "browser").await?;
    let prefetches = ns.api::<Prefetch>();
    // slow.invalid images take about 30 s to pull on the fake nodes.
    apply(
        &prefetches,
        prefetch_json(
            "warming",
            json!({ "images": ["slow.invalid/app:1"], "node_filter": "worker" }),
        ),
    )
    .await?;
    apply(
        &prefetches,
        prefetch_json(
            "broken",
            json!({ "images": ["fail.invalid/app:1"], "node_filter": "worker2" }),
        ),
    )
    .await?;
    let orchestrator = Orchestrator::start("browser", Options::default()).await?;
    let driver = Driver::start().await?;
    let browser = driver.browser().await?;
    let result = scenario(&browser, &orchestrator, &clusters, ns.name()).await;
    let _ = browser.close().await;
    result?;
    ns.cleanup().await?;
    Ok(())
}

async fn scenario(
    browser: &Client,
    orchestrator: &Orchestrator,
    clusters: &[String],
    namespace: &str,
) -> Result<()> {
    browser.set_window_size(LAPTOP.0, LAPTOP.1).await?;
    browser
        .goto(&format!("http://127.0.0.1:{}/", orchestrator.port))
        .await?;
    // A mark that a reload would wipe.
    page_eval(browser, "window.loadedOnce = true; return null").await?;

    for cluster in clusters {
        wait_page(
            browser,
            &format!("{cluster} listed as Connected"),
            Duration::from_secs(30),
            &cluster_row(cluster, &["Connected"]),
        )
        .await?;
    }

    let warming = format!("{}/{namespace}/warming", clusters[0]);
    let broken = format!("{}/{namespace}/broken", clusters[0]);
    let first = wait_page(
        browser,
        "the warming Prefetch",
        Duration::from_secs(30),
        &prefetch_row(&warming, &[]),
    )
    .await?;
    ensure!(
        first.as_str().is_some_and(|text| !text.contains("READY")),
        "the slow pulls cannot be done yet: {first}"
    );
    let failing = wait_page(
        browser,
        "the broken Prefetch FAILED with its reason",
        Duration::from_secs(90),
        &prefetch_row(&broken, &["FAILED", "ErrImagePull"]),
    )
    .await?;
    ensure!(
        failing
            .as_str()
            .is_some_and(|text| text.contains("fail.invalid/app:1")),
        "the failure names the image: {failing}"
    );
    wait_page(
        browser,
        "the warming Prefetch READY",
        Duration::from_secs(120),
        &prefetch_row(&warming, &["READY"]),
    )
    .await?;
    ensure!(
        page_eval(browser, "return window.loadedOnce === true").await? == Value::Bool(true),
        "the page was reloaded"
    );
    let laptop = screenshot(browser, LAPTOP, "dashboard-laptop").await?;
    let phone = screenshot(browser, PHONE, "dashboard-phone").await?;
    browser.set_window_size(LAPTOP.0, LAPTOP.1).await?;
    println!("screenshots: {} {}", laptop.display(), phone.display());

    drill_down(browser, &clusters[0], &warming).await?;
    failed_pair(browser, &broken).await?;

    // Stop the last cluster's API server: Unreachable within seconds.
    let last = clusters.last().context("no cluster")?;
    let mut stopped = KilledDaemon::kill(last, "kube-apiserver")?;
    let stopped_at = Instant::now();
    let outcome = wait_page(
        browser,
        &format!("{last} Unreachable"),
        Duration::from_secs(30),
        &cluster_row(last, &["Unreachable"]),
    )
    .await;
    let seen_after = stopped_at.elapsed();
    stopped.start()?;
    outcome?;
    wait_page(
        browser,
        &format!("{last} Connected again"),
        Duration::from_secs(120),
        &cluster_row(last, &["Connected"]),
    )
    .await?;
    println!("{last}: Unreachable shown {seen_after:.1?} after its API server stopped");
    Ok(())
}

/// Opens the drill-down of `key` (`cluster/namespace/name`) from the
/// keyboard: its grid shows the workers ready and the control plane
/// skipped by `node_filter`, with the reason in words; its search narrows
/// the grid; "All Prefetches" leads back to the list.
async fn drill_down(browser: &Client, cluster: &str, key: &str) -> Result<()> {
    let link = browser
        .find(Locator::Css(&format!(
            "#prefetches tbody tr[data-key={key:?}] a"
        )))
        .await
        .context("the Prefetch's link")?;
    // WebDriver's Enter key: the link works from the keyboard.
    link.send_keys("\u{E007}").await?;
    let control_plane = format!("{cluster}-control-plane");
    let skipped = wait_page(
        browser,
        "the drill-down listing the control plane as skipped, with its reason",
        Duration::from_secs(15),
        &format!(
            "const row = document.querySelector('#skipped tbody tr[data-node={control_plane:?}]'); return row && row.offsetParent !== null && row.innerText.includes('name does not contain node_filter') ? row.innerText : null;"
        ),
    )
    .await?;
    ensure!(
        skipped
            .as_str()
            .is_some_and(|text| text.contains("node_filter")),
        "the skipped row names the reason: {skipped}"
    );
    let worker = format!("{cluster}-worker");
    wait_page(
        browser,
        "the grid showing a worker's image ready",
        Duration::from_secs(15),
        &format!(
            "const row = document.querySelector('#grid tbody tr[data-node={worker:?}]'); return row && row.innerText.includes('ready') ? row.innerText : null;"
        ),
    )
    .await?;
    let heading = page_eval(
        browser,
        "const h = document.getElementById('drilldown-heading'); return [h.innerText, document.activeElement === h, document.getElementById('overview').hidden, document.getElementById('legend').innerText];",
    )
    .await?;
    ensure!(
        heading[0]
            .as_str()
            .is_some_and(|text| text.contains("warming"))
            && heading[1] == Value::Bool(true)
            && heading[2] == Value::Bool(true)
            && heading[3]
                .as_str()
                .is_some_and(|text| text.contains("backing off")),
        "the drill-down replaces the list, takes the focus and has a legend: {heading}"
    );
    let laptop = screenshot(browser, LAPTOP, "drilldown-laptop").await?;
    let phone = screenshot(browser, PHONE, "drilldown-phone").await?;
    browser.set_window_size(LAPTOP.0, LAPTOP.1).await?;
    println!("screenshots: {} {}", laptop.display(), phone.display());

    // A search for one worker leaves it alone in the grid.
    let worker2 = format!("{cluster}-worker2");
    browser
        .find(Locator::Id("drilldown-search"))
        .await?
        .send_keys(&worker2)
        .await?;
    wait_page(
        browser,
        "the search narrowing the grid to one worker",
        Duration::from_secs(15),
        &format!(
            "const rows = [...document.querySelectorAll('#grid tbody tr')].map(r => r.dataset.node); return rows.length === 1 && rows[0] === {worker2:?} && document.querySelectorAll('#skipped tbody tr').length === 0;"
        ),
    )
    .await?;

    browser
        .find(Locator::Id("drilldown-back"))
        .await?
        .click()
        .await?;
    wait_page(
        browser,
        "the list again",
        Duration::from_secs(5),
        "return !document.getElementById('overview').hidden && !document.getElementById('clusters-section').hidden && document.getElementById('drilldown').hidden;",
    )
    .await?;
    Ok(())
}

/// The broken Prefetch's grid shows its failed pair: the reason, the
/// attempts, and the registry's error.
async fn failed_pair(browser: &Client, key: &str) -> Result<()> {
    browser
        .find(Locator::Css(&format!(
            "#prefetches tbody tr[data-key={key:?}] a"
        )))
        .await
        .context("the broken Prefetch's link")?
        .click()
        .await?;
    let cell = wait_page(
        browser,
        "the failed pair in the grid",
        Duration::from_secs(15),
        "const cell = document.querySelector('#grid tbody td.pair-failed'); return cell && cell.innerText.includes('ErrImagePull') ? cell.innerText : null;",
    )
    .await?;
    ensure!(
        cell.as_str()
            .is_some_and(|text| text.contains("attempt") && text.contains("fail.invalid")),
        "the failed cell gives the attempts and the error: {cell}"
    );
    browser.back().await?;
    wait_page(
        browser,
        "the list again",
        Duration::from_secs(5),
        "return !document.getElementById('overview').hidden;",
    )
    .await?;
    Ok(())
}
