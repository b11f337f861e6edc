// The dashboard: renders every status document that /api/v1/events sends.
// EventSource reconnects by itself (the server sends `retry:`), so a
// restarted kube-prefetch or a dropped connection heals without a reload.
// A Prefetch's drill-down (#prefetch/CLUSTER/NAMESPACE/NAME) asks
// /api/v1/clusters/…/nodes again on every status update while it is open.
"use strict";

let latest = null;

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

// The row's own name, as a row header for screen readers.
function rowHeader(row, text) {
  const th = document.createElement("th");
  th.scope = "row";
  th.textContent = text;
  row.appendChild(th);
  return th;
}

function healthDetail(cluster) {
  return cluster.version || cluster.reason || cluster.what || "";
}

function renderClusters(view) {
  const body = document.querySelector("#clusters tbody");
  body.replaceChildren();
  for (const cluster of view.clusters) {
    const row = body.insertRow();
    rowHeader(row, cluster.name);
    cell(row, cluster.state, "state-" + cluster.state);
    cell(row, healthDetail(cluster));
    cell(row, String(cluster.prefetches.length), "number");
    cell(row, String(cluster.prefetches.filter((p) => p.phase === "READY").length), "number");
    cell(row, String(cluster.prefetches.filter((p) => p.phase === "FAILED").length), "number");
  }
}

// Options of a filter <select>, rebuilt only when the values change (an
// open drop-down would close on every update otherwise).
function fillSelect(id, values) {
  const select = document.getElementById(id);
  const wanted = ["", ...values];
  const have = [...select.options].map((option) => option.value);
  if (wanted.join("\n") === have.join("\n")) return;
  const chosen = select.value;
  select.replaceChildren();
  for (const value of wanted) {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = value || "any";
    select.appendChild(option);
  }
  // A chosen value whose last Prefetch went stays, so the choice is not lost.
  if (chosen && !wanted.includes(chosen)) {
    const option = document.createElement("option");
    option.value = chosen;
    option.textContent = chosen;
    select.appendChild(option);
  }
  select.value = chosen;
}

function renderFilters(view) {
  const namespaces = new Set();
  for (const cluster of view.clusters) {
    for (const prefetch of cluster.prefetches) namespaces.add(prefetch.namespace);
  }
  fillSelect("cluster-filter", view.clusters.map((cluster) => cluster.name));
  fillSelect("namespace-filter", [...namespaces].sort());
}

function matches(cluster, prefetch) {
  const phase = document.getElementById("phase").value;
  if (phase && prefetch.phase !== phase) return false;
  const clusterName = document.getElementById("cluster-filter").value;
  if (clusterName && cluster.name !== clusterName) return false;
  const namespace = document.getElementById("namespace-filter").value;
  if (namespace && prefetch.namespace !== namespace) return false;
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
      " (" + plural(failure.attempts, "attempt") +
      (failure.permanent ? ", permanent" : "") + "): " + failure.last_error;
    if (failure.permanent) item.className = "permanent";
    list.appendChild(item);
  }
  details.appendChild(list);
  td.appendChild(details);
}

function plural(count, word) {
  return count + " " + word + (count === 1 ? "" : "s");
}

// The drill-down's address: #prefetch/CLUSTER/NAMESPACE/NAME, each part
// URI-encoded (a kubeconfig context may hold "/" or ":").
function drilldownHash(cluster, namespace, name) {
  return "#prefetch/" + [cluster, namespace, name].map(encodeURIComponent).join("/");
}

function progressCell(row, prefetch) {
  const progress = row.insertCell();
  const bar = document.createElement("progress");
  bar.max = Math.max(prefetch.pulls.total, 1);
  bar.value = prefetch.pulls.total === 0 ? 1 : prefetch.pulls.ready;
  bar.setAttribute("aria-label", "ready pairs of " + prefetch.namespace + "/" + prefetch.name);
  progress.appendChild(bar);
  progress.append(" " + prefetch.pulls.ready + " / " + prefetch.pulls.total);
}

function renderPrefetches(view) {
  const body = document.querySelector("#prefetches tbody");
  // Keep open failure lists open, and the focused link focused, across updates.
  const open = new Set([...body.querySelectorAll("details[open]")].map((d) => d.closest("tr").dataset.key));
  const active = document.activeElement;
  const focused = active && active.tagName === "A" && body.contains(active) ? active.closest("tr").dataset.key : null;
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
      const link = document.createElement("a");
      link.href = drilldownHash(cluster.name, prefetch.namespace, prefetch.name);
      link.textContent = prefetch.namespace + "/" + prefetch.name;
      link.title = "Nodes × images of " + prefetch.namespace + "/" + prefetch.name + " in " + cluster.name;
      name.appendChild(link);
      row.appendChild(name);
      cell(row, prefetch.phase, "phase-" + prefetch.phase);
      progressCell(row, prefetch);
      cell(row, String(prefetch.pulls.in_flight), "number");
      cell(row, String(prefetch.pulls.failed), "number");
      cell(row, String(prefetch.nodes), "number");
      failuresCell(row, prefetch);
      const details = row.querySelector("details");
      if (details && open.has(key)) details.open = true;
      if (focused === key) link.focus();
    }
  }
  document.getElementById("empty").hidden = shown > 0;
}

// ---- The drill-down of one Prefetch ----

let drill = null; // {cluster, namespace, name} while a drill-down is open
let gridLoading = false;
let gridAgain = false;
let searchTimer = null;

function parseHash() {
  const match = /^#prefetch\/([^/]+)\/([^/]+)\/([^/]+)$/.exec(location.hash);
  if (!match) return null;
  try {
    const [cluster, namespace, name] = match.slice(1).map(decodeURIComponent);
    return { cluster, namespace, name };
  } catch (error) {
    return null;
  }
}

function drillKey(target) {
  return target ? [target.cluster, target.namespace, target.name].join("/") : "";
}

function summaryOf(target) {
  if (!latest || !target) return null;
  const cluster = latest.clusters.find((c) => c.name === target.cluster);
  if (!cluster) return null;
  return cluster.prefetches.find((p) => p.namespace === target.namespace && p.name === target.name) || null;
}

function showRoute() {
  const target = parseHash();
  const before = drillKey(drill);
  drill = target;
  // The drill-down is a page of its own: the lists make way for it.
  document.getElementById("clusters-section").hidden = Boolean(target);
  document.getElementById("overview").hidden = Boolean(target);
  document.getElementById("drilldown").hidden = !target;
  if (!target) {
    // Back on the list: focus the link that was opened, for keyboard users.
    const row = document.querySelector('#prefetches tbody tr[data-key="' + CSS.escape(before) + '"]');
    const link = row && row.querySelector("a");
    if (link) link.focus();
    return;
  }
  if (drillKey(target) !== before) {
    document.getElementById("drilldown-search").value = "";
    document.getElementById("drilldown-heading").textContent =
      target.namespace + "/" + target.name + " in " + target.cluster;
    document.querySelector("#grid thead").replaceChildren();
    document.querySelector("#grid tbody").replaceChildren();
    document.querySelector("#skipped tbody").replaceChildren();
    document.getElementById("drilldown-summary").textContent = "Loading nodes…";
    window.scrollTo(0, 0);
    document.getElementById("drilldown-heading").focus();
  }
  renderDrilldownPhase();
  loadGrid();
}

// The Prefetch's phase and counts, and its cluster's state (a grid of an
// Unreachable cluster is its last known state), from the live status.
function renderDrilldownPhase() {
  const line = document.getElementById("drilldown-phase");
  line.replaceChildren();
  if (!latest || !drill) return;
  const cluster = latest.clusters.find((c) => c.name === drill.cluster);
  const prefetch = summaryOf(drill);
  if (prefetch) {
    const phase = document.createElement("strong");
    phase.className = "phase-" + prefetch.phase;
    phase.textContent = prefetch.phase;
    line.append(phase, " — " + prefetch.pulls.ready + " of " + prefetch.pulls.total + " pairs ready, " +
      prefetch.pulls.in_flight + " in flight, " + prefetch.pulls.failed + " failed. ");
  }
  if (cluster) {
    const state = document.createElement("span");
    state.className = "state-" + cluster.state;
    state.textContent = cluster.state;
    line.append("Cluster " + cluster.name + ": ", state);
    const detail = healthDetail(cluster);
    if (detail && cluster.state !== "Connected") line.append(" (" + detail + ")");
    line.append(". ");
  }
  if (prefetch && prefetch.message) line.append(prefetch.message);
}

function nodesUrl(target) {
  const search = document.getElementById("drilldown-search").value.trim();
  return "/api/v1/clusters/" + encodeURIComponent(target.cluster) +
    "/prefetches/" + encodeURIComponent(target.namespace) + "/" + encodeURIComponent(target.name) +
    "/nodes" + (search ? "?q=" + encodeURIComponent(search) : "");
}

// One request at a time; an update that comes meanwhile asks once more after.
async function loadGrid() {
  if (!drill) return;
  if (gridLoading) {
    gridAgain = true;
    return;
  }
  gridLoading = true;
  const target = drill;
  const url = nodesUrl(target);
  let answer;
  try {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    const body = await response.json().catch(() => ({ error: response.status + " " + response.statusText }));
    answer = response.ok ? { grid: body } : { error: body.error || response.statusText };
  } catch (error) {
    answer = { error: "Cannot load the nodes: " + error.message };
  }
  gridLoading = false;
  // Another Prefetch or search was chosen meanwhile: ask again for that.
  if (drillKey(target) !== drillKey(drill) || url !== (drill && nodesUrl(drill))) gridAgain = true;
  else if (answer.grid) renderGrid(answer.grid);
  else renderGridError(answer.error);
  if (gridAgain) {
    gridAgain = false;
    loadGrid();
  }
}

function renderGridError(message) {
  document.getElementById("drilldown-summary").textContent = message;
}

const PAIR_SYMBOLS = {
  ready: "✓", reverifying: "↻", pending: "○", in_flight: "↓", backing_off: "‖", failed: "✗",
};

// The visible text of one pair and its longer explanation (the tooltip).
function describePair(pair) {
  switch (pair.state) {
    case "ready":
      return ["ready", "On the node; checked again in " + pair.recheck_in_seconds + " s"];
    case "reverifying":
      return ["re-verifying", "On the node and being checked again" + (pair.pod ? " by pod " + pair.pod : "")];
    case "pending":
      return ["waiting", "Needs a pull; waits for a pull slot"];
    case "in_flight":
      return ["pulling " + pair.for_seconds + " s", "Pull pod " + pair.pod + " running for " + pair.for_seconds + " s"];
    case "backing_off": {
      const text = "retry in " + pair.retry_in_seconds + " s · " + plural(pair.attempts, "attempt");
      return [text + (pair.reason ? " · " + pair.reason : ""), pair.last_error || "Waits to retry"];
    }
    case "failed": {
      const text = (pair.reason || "failed") + " · " + plural(pair.attempts, "attempt") +
        (pair.permanent ? " · permanent" : "");
      return [text, pair.last_error + " (a new round in " + pair.retry_in_seconds + " s)"];
    }
    default:
      return [pair.state, ""];
  }
}

// "docker.io/library/busybox:1.36" reads "busybox:1.36" in a column header.
function shortImage(image) {
  return image.replace(/^docker\.io\/library\//, "").replace(/^docker\.io\//, "");
}

function renderGrid(grid) {
  renderDrilldownPhase();
  const search = document.getElementById("drilldown-search").value.trim().toLowerCase();
  // Searching an image shows its column alone; a node search shows them all.
  const wanted = grid.images.filter((image) => search && image.toLowerCase().includes(search));
  const images = wanted.length > 0 ? wanted : grid.images;

  const head = document.querySelector("#grid thead");
  const headRow = document.createElement("tr");
  const corner = document.createElement("th");
  corner.scope = "col";
  corner.textContent = "Node";
  headRow.appendChild(corner);
  for (const image of images) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = shortImage(image);
    th.title = image;
    headRow.appendChild(th);
  }
  head.replaceChildren(headRow);

  const body = document.querySelector("#grid tbody");
  const skippedBody = document.querySelector("#skipped tbody");
  body.replaceChildren();
  skippedBody.replaceChildren();
  let targeted = 0;
  let skipped = 0;
  for (const node of grid.nodes) {
    if (node.state === "skipped") {
      skipped += 1;
      const row = skippedBody.insertRow();
      row.dataset.node = node.node;
      rowHeader(row, node.node);
      cell(row, node.text);
      const code = cell(row, "");
      const tag = document.createElement("code");
      tag.textContent = node.reason;
      code.appendChild(tag);
      continue;
    }
    targeted += 1;
    const row = body.insertRow();
    row.dataset.node = node.node;
    rowHeader(row, node.node);
    const pairs = new Map((node.pairs || []).map((pair) => [pair.image, pair]));
    for (const image of images) {
      const pair = pairs.get(image);
      const td = row.insertCell();
      if (!pair) {
        td.className = "pair pair-none";
        td.textContent = node.state === "not_planned" ? "not planned" : "–";
        td.title = node.state === "not_planned"
          ? "Targeted, but nothing is planned yet (see the Prefetch's message)"
          : "This image is not for this node";
        continue;
      }
      const [text, detail] = describePair(pair);
      td.className = "pair pair-" + pair.state;
      td.title = detail;
      const symbol = document.createElement("span");
      symbol.setAttribute("aria-hidden", "true");
      symbol.textContent = (PAIR_SYMBOLS[pair.state] || "") + " ";
      td.append(symbol, text);
      if ((pair.state === "failed" || pair.state === "backing_off") && pair.last_error) {
        const error = document.createElement("small");
        error.textContent = pair.last_error;
        td.appendChild(error);
      }
    }
  }
  document.getElementById("grid-empty").hidden = targeted > 0;
  document.getElementById("skipped-empty").hidden = skipped > 0;

  const reasons = Object.entries(grid.skipped_nodes)
    .map(([reason, count]) => reason + " " + count).join(", ");
  const skippedTotal = Object.values(grid.skipped_nodes).reduce((sum, count) => sum + count, 0);
  document.getElementById("drilldown-summary").textContent =
    plural(grid.total_nodes, "node") + " in the cluster: " + grid.targeted_nodes + " targeted, " +
    skippedTotal + " skipped" + (reasons ? " (" + reasons + ")" : "") +
    (grid.not_planned_nodes ? ", " + grid.not_planned_nodes + " not planned" : "") + ".";
  const omitted = document.getElementById("omitted");
  omitted.hidden = grid.omitted === 0;
  omitted.textContent = "Showing " + grid.nodes.length + " of " + plural(grid.matched, "matching node") +
    " (at most " + grid.limit + " at once): search to narrow them.";
}

function render() {
  if (!latest) return;
  renderClusters(latest);
  renderFilters(latest);
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
    if (drill) {
      renderDrilldownPhase();
      loadGrid();
    }
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
  for (const id of ["phase", "cluster-filter", "namespace-filter"]) {
    document.getElementById(id).addEventListener("change", render);
  }
  for (const id of ["filters", "drilldown-filters"]) {
    document.getElementById(id).addEventListener("submit", (event) => event.preventDefault());
  }
  document.getElementById("drilldown-search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(loadGrid, 250);
  });
  window.addEventListener("hashchange", showRoute);
  showRoute();
  connect();
});
