// The dashboard: renders every status document that /api/v1/events sends.
// EventSource reconnects by itself (the server sends `retry:`), so a
// restarted kube-prefetch or a dropped connection heals without a reload.
"use strict";

let latest = null;

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function healthDetail(cluster) {
  return cluster.version || cluster.reason || cluster.what || "";
}

function renderClusters(view) {
  const body = document.querySelector("#clusters tbody");
  body.replaceChildren();
  for (const cluster of view.clusters) {
    const row = body.insertRow();
    const name = document.createElement("th");
    name.scope = "row";
    name.textContent = cluster.name;
    row.appendChild(name);
    cell(row, cluster.state, "state-" + cluster.state);
    cell(row, healthDetail(cluster));
    cell(row, String(cluster.prefetches.length), "number");
    cell(row, String(cluster.prefetches.filter((p) => p.phase === "READY").length), "number");
    cell(row, String(cluster.prefetches.filter((p) => p.phase === "FAILED").length), "number");
  }
}

function matches(cluster, prefetch) {
  const phase = document.getElementById("phase").value;
  if (phase && prefetch.phase !== phase) return false;
  const words = document.getElementById("search").value.trim().toLowerCase().split(/\s+/).filter(Boolean);
  const text = [cluster.name, prefetch.namespace, prefetch.name, prefetch.phase].join(" ").toLowerCase();
  return words.every((word) => text.includes(word));
}

function failuresCell(row, prefetch) {
  const td = row.insertCell();
  if (prefetch.message) {
    const message = document.createElement("p");
    message.textContent = prefetch.message;
    td.appendChild(message);
  }
  const failures = prefetch.failures || [];
  if (failures.length === 0) return;
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = failures.length + (failures.length === 1 ? " failure" : " failures");
  details.appendChild(summary);
  const list = document.createElement("ul");
  for (const failure of failures) {
    const item = document.createElement("li");
    item.textContent = failure.node + ": " + failure.image + " — " + failure.reason +
      " (" + failure.attempts + (failure.attempts === 1 ? " attempt" : " attempts") +
      (failure.permanent ? ", permanent" : "") + "): " + failure.last_error;
    if (failure.permanent) item.className = "permanent";
    list.appendChild(item);
  }
  details.appendChild(list);
  td.appendChild(details);
}

function renderPrefetches(view) {
  const body = document.querySelector("#prefetches tbody");
  // Keep open failure lists open across updates.
  const open = new Set([...body.querySelectorAll("details[open]")].map((d) => d.closest("tr").dataset.key));
  body.replaceChildren();
  let shown = 0;
  for (const cluster of view.clusters) {
    for (const prefetch of cluster.prefetches) {
      if (!matches(cluster, prefetch)) continue;
      shown += 1;
      const row = body.insertRow();
      const key = cluster.name + "/" + prefetch.namespace + "/" + prefetch.name;
      row.dataset.key = key;
      cell(row, cluster.name);
      const name = document.createElement("th");
      name.scope = "row";
      name.textContent = prefetch.namespace + "/" + prefetch.name;
      row.appendChild(name);
      cell(row, prefetch.phase, "phase-" + prefetch.phase);
      const progress = row.insertCell();
      const bar = document.createElement("progress");
      bar.max = Math.max(prefetch.pulls.total, 1);
      bar.value = prefetch.pulls.total === 0 ? 1 : prefetch.pulls.ready;
      bar.setAttribute("aria-label", "ready pairs of " + prefetch.namespace + "/" + prefetch.name);
      progress.appendChild(bar);
      progress.append(" " + prefetch.pulls.ready + " / " + prefetch.pulls.total);
      cell(row, String(prefetch.pulls.in_flight), "number");
      cell(row, String(prefetch.pulls.failed), "number");
      cell(row, String(prefetch.nodes), "number");
      failuresCell(row, prefetch);
      const details = row.querySelector("details");
      if (details && open.has(key)) details.open = true;
    }
  }
  document.getElementById("empty").hidden = shown > 0;
}

function render() {
  if (!latest) return;
  renderClusters(latest);
  renderPrefetches(latest);
}

function connect() {
  const connection = document.getElementById("connection");
  const events = new EventSource("/api/v1/events");
  events.addEventListener("status", (event) => {
    latest = JSON.parse(event.data);
    connection.dataset.state = "live";
    connection.textContent = "Live, updated " + new Date().toLocaleTimeString();
    render();
  });
  events.addEventListener("error", () => {
    connection.dataset.state = "reconnecting";
    connection.textContent = "Connection lost, reconnecting…";
    // EventSource retries by itself unless the answer was an HTTP error
    // (a proxy's 502, say): then it closes, and we start again.
    if (events.readyState === EventSource.CLOSED) setTimeout(connect, 3000);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("search").addEventListener("input", render);
  document.getElementById("phase").addEventListener("change", render);
  document.getElementById("filters").addEventListener("submit", (event) => event.preventDefault());
  connect();
});
