//! Benchmarks of the pure planning hot paths (`src/pull/`) at fleet scale.
//!
//! `cargo bench --bench planning [-- FILTER]` prints one table row per
//! benchmark: median, fastest and slowest time per operation over several
//! samples, and heap allocations and bytes allocated per operation (counted
//! by a wrapping global allocator, so memory is measured, not guessed). A
//! second table gives the heap retained by the big structures an actor keeps
//! (the desired set, the tracker). FILTER keeps benchmarks whose name
//! contains it. See BENCHMARKS.md for the numbers and how to read them.
//!
//! Plain `std::time::Instant` and no harness crate: the project wants no new
//! dependency for this, and median-of-samples is all we report.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Taint, Toleration,
};
use kube_prefetch::api::WorkloadKind;
use kube_prefetch::pull::dispatch::DispatchQueue;
use kube_prefetch::pull::image::{NodeImages, node_has_image, normalize};
use kube_prefetch::pull::plan::{
    DesiredSet, ExtraImages, PairKey, Planner, PullSettings, PullTarget, desired_pulls,
};
use kube_prefetch::pull::podspec::{PullMethod, PullPodParams, build_pull_pod};
use kube_prefetch::pull::targeting::{NodeTargeting, NodeView, SchedulingConstraints};
use kube_prefetch::pull::tracker::{BackoffPolicy, Outcome, Tracker};
use kube_prefetch::pull::workload::WorkloadImages;

// ---------------------------------------------------------------------------
// Allocation counting

/// Counts every allocation of the process. Relaxed atomics: the benchmark is
/// single-threaded, and the counters are read only between samples.
struct CountingAlloc;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES_ALLOCATED: AtomicU64 = AtomicU64::new(0);
static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

fn record_alloc(size: usize) {
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    BYTES_ALLOCATED.fetch_add(size as u64, Ordering::Relaxed);
    LIVE_BYTES.fetch_add(size, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// wrapper only updates counters.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            record_alloc(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            record_alloc(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as ours.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            // A realloc is a fresh allocation as far as cost goes; live
            // bytes move by the difference.
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            BYTES_ALLOCATED.fetch_add(new_size as u64, Ordering::Relaxed);
            LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        new
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn alloc_counters() -> (u64, u64) {
    (
        ALLOCATIONS.load(Ordering::Relaxed),
        BYTES_ALLOCATED.load(Ordering::Relaxed),
    )
}

/// Heap bytes that building `make`'s value leaves allocated, with the value.
fn retained<T>(make: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let value = make();
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    (value, after.saturating_sub(before))
}

// ---------------------------------------------------------------------------
// Measurement

/// Wall time per benchmark, spread over its samples. Small on purpose: the
/// machine is shared. Benchmarks slower than TIME_BUDGET / MIN_SAMPLES still
/// get MIN_SAMPLES samples, so a full run takes about a minute.
const TIME_BUDGET: Duration = Duration::from_millis(400);
/// A sample repeats the routine until it lasts at least this long, so timer
/// resolution and loop overhead do not dominate nanosecond-scale operations.
const MIN_SAMPLE: Duration = Duration::from_millis(2);
const MIN_SAMPLES: usize = 5;
const MAX_SAMPLES: usize = 200;

struct Row {
    name: String,
    /// Operations per routine call (e.g. 12 references normalised per call).
    ops_per_call: usize,
    samples: usize,
    calls_per_sample: usize,
    /// Nanoseconds per operation.
    median: f64,
    fastest: f64,
    slowest: f64,
    allocs_per_op: f64,
    bytes_per_op: f64,
    note: String,
}

struct Bench {
    filter: Option<String>,
    rows: Vec<Row>,
    retained: Vec<(String, usize, String)>,
}

impl Bench {
    fn wants(&self, name: &str) -> bool {
        self.filter
            .as_deref()
            .is_none_or(|filter| name.contains(filter))
    }

    /// Times `routine`, whose result is dropped inside the timed region:
    /// freeing what an operation allocated is part of its real cost.
    fn run<R>(
        &mut self,
        name: &str,
        ops_per_call: usize,
        note: &str,
        mut routine: impl FnMut() -> R,
    ) {
        self.run_with_setup(name, ops_per_call, note, || (), |_| routine());
    }

    /// Times `routine` on inputs made by `setup` outside the timed region
    /// (e.g. a fresh tracker); the inputs are dropped outside it too.
    fn run_with_setup<T, R>(
        &mut self,
        name: &str,
        ops_per_call: usize,
        note: &str,
        mut setup: impl FnMut() -> T,
        mut routine: impl FnMut(&mut T) -> R,
    ) {
        if !self.wants(name) {
            return;
        }
        // Warm-up call, which also calibrates the sample size.
        let mut input = setup();
        let start = Instant::now();
        drop(black_box(routine(black_box(&mut input))));
        let once = start.elapsed().max(Duration::from_nanos(1));
        drop(input);

        let calls_per_sample = usize::try_from(MIN_SAMPLE.as_nanos() / once.as_nanos())
            .unwrap_or(usize::MAX)
            .clamp(1, 100_000);
        let per_sample = once * u32::try_from(calls_per_sample).unwrap_or(u32::MAX);
        let samples = usize::try_from(TIME_BUDGET.as_nanos() / per_sample.as_nanos().max(1))
            .unwrap_or(usize::MAX)
            .clamp(MIN_SAMPLES, MAX_SAMPLES);

        let ops = (calls_per_sample * ops_per_call) as f64;
        let mut per_op: Vec<f64> = Vec::with_capacity(samples);
        let mut allocs = 0u64;
        let mut bytes = 0u64;
        for _ in 0..samples {
            let mut inputs: Vec<T> = (0..calls_per_sample).map(|_| setup()).collect();
            let (allocs_before, bytes_before) = alloc_counters();
            let start = Instant::now();
            for input in &mut inputs {
                drop(black_box(routine(black_box(input))));
            }
            let elapsed = start.elapsed();
            let (allocs_after, bytes_after) = alloc_counters();
            drop(inputs);
            allocs += allocs_after - allocs_before;
            bytes += bytes_after - bytes_before;
            per_op.push(elapsed.as_nanos() as f64 / ops);
        }
        per_op.sort_by(f64::total_cmp);
        let total_ops = ops * samples as f64;
        let row = Row {
            name: name.to_string(),
            ops_per_call,
            samples,
            calls_per_sample,
            median: median(&per_op),
            fastest: per_op[0],
            slowest: per_op[per_op.len() - 1],
            allocs_per_op: allocs as f64 / total_ops,
            bytes_per_op: bytes as f64 / total_ops,
            note: note.to_string(),
        };
        eprintln!("  {:<44} {:>10}", row.name, format_ns(row.median));
        self.rows.push(row);
    }

    fn record_retained(&mut self, name: &str, bytes: usize, note: String) {
        if self.wants(name) {
            self.retained.push((name.to_string(), bytes, note));
        }
    }

    fn print(&self) {
        println!();
        println!(
            "| benchmark | median / op | fastest | slowest | allocs / op | bytes / op | samples x calls x ops | note |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
        for row in &self.rows {
            println!(
                "| {} | {} | {} | {} | {:.1} | {} | {} x {} x {} | {} |",
                row.name,
                format_ns(row.median),
                format_ns(row.fastest),
                format_ns(row.slowest),
                row.allocs_per_op,
                format_bytes(row.bytes_per_op),
                row.samples,
                row.calls_per_sample,
                row.ops_per_call,
                row.note,
            );
        }
        if !self.retained.is_empty() {
            println!();
            println!("| retained heap | bytes | note |");
            println!("| --- | ---: | --- |");
            for (name, bytes, note) in &self.retained {
                println!("| {name} | {} | {note} |", format_bytes(*bytes as f64));
            }
        }
    }
}

fn median(sorted: &[f64]) -> f64 {
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

fn format_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.2} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn format_bytes(bytes: f64) -> String {
    if bytes >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
    } else if bytes >= 1024.0 {
        format!("{:.1} KiB", bytes / 1024.0)
    } else {
        format!("{bytes:.0} B")
    }
}

// ---------------------------------------------------------------------------
// Fleet data: shaped like a production cluster, not like a unit test

/// References as they appear in pod templates: short Docker Hub names,
/// tags, digests, registry ports, deep ECR paths.
const REFERENCES: &[&str] = &[
    "nginx",
    "nginx:1.27.3",
    "library/redis:7.4-alpine",
    "docker.io/bitnami/postgresql:16.4.0-debian-12-r14",
    "registry.k8s.io/pause:3.10",
    "gcr.io/distroless/static-debian12:nonroot",
    "quay.io/prometheus/node-exporter:v1.8.2",
    "ghcr.io/acme/payments-api@sha256:4f1b3c2d9a8e7f6051423b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e",
    "ghcr.io/acme/checkout:2.14.0@sha256:0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9",
    "localhost:5000/team/app:dev",
    "123456789012.dkr.ecr.eu-west-1.amazonaws.com/platform/ingest-worker:2024.10.1",
    "docker.io/istio/proxyv2:1.24.1",
];

const ZONES: &[&str] = &["eu-west-1a", "eu-west-1b", "eu-west-1c"];
const INSTANCE_TYPES: &[&str] = &["m6i.2xlarge", "m6i.4xlarge", "c6i.4xlarge", "r6i.2xlarge"];

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

fn taint(key: &str, value: Option<&str>, effect: &str) -> Taint {
    Taint {
        key: key.to_string(),
        value: value.map(str::to_string),
        effect: effect.to_string(),
        ..Taint::default()
    }
}

fn toleration(key: &str, operator: &str, value: Option<&str>, effect: Option<&str>) -> Toleration {
    Toleration {
        key: Some(key.to_string()),
        operator: Some(operator.to_string()),
        value: value.map(str::to_string),
        effect: effect.map(str::to_string),
        ..Toleration::default()
    }
}

fn requirement(key: &str, operator: &str, values: &[&str]) -> NodeSelectorRequirement {
    NodeSelectorRequirement {
        key: key.to_string(),
        operator: operator.to_string(),
        values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
    }
}

fn affinity(terms: Vec<Vec<NodeSelectorRequirement>>) -> NodeSelector {
    NodeSelector {
        node_selector_terms: terms
            .into_iter()
            .map(|expressions| NodeSelectorTerm {
                match_expressions: Some(expressions),
                match_fields: None,
            })
            .collect(),
    }
}

/// The `status.images[].names` a busy node reports: the kubelet's maximum
/// of 50 images, each as `repo@sha256:...` and `repo:tag`.
fn reported_images(node_index: usize) -> Vec<String> {
    let mut names = Vec::with_capacity(100);
    for image in 0..50 {
        // A few images differ per node so not every list is identical.
        let repository = format!(
            "registry.example.com/team-{}/service-{}",
            image % 7,
            (image + node_index % 3) % 50
        );
        names.push(format!("{repository}@sha256:{:064x}", image * 7919 + 1));
        names.push(format!("{repository}:v1.{image}.0"));
    }
    names
}

/// `count` nodes: 3 tainted control planes, then workers spread over zones,
/// instance types and pools; every 10th is a tainted GPU node, every 7th a
/// dedicated batch node, every 25th arm64, a few NotReady or cordoned.
fn nodes(count: usize) -> Vec<NodeView> {
    (0..count)
        .map(|index| {
            let control_plane = index < 3;
            let name = if control_plane {
                format!("prod-eu-1-control-plane-{index}")
            } else {
                format!("prod-eu-1-worker-{index:05}")
            };
            let zone = ZONES[index % ZONES.len()];
            let arch = if index % 25 == 24 { "arm64" } else { "amd64" };
            let gpu = !control_plane && index % 10 == 9;
            let batch = !control_plane && index % 7 == 6;
            let pool = if gpu {
                "gpu"
            } else if batch {
                "batch"
            } else {
                "general"
            };
            let mut node_labels = labels(&[
                ("kubernetes.io/hostname", &name),
                ("kubernetes.io/os", "linux"),
                ("kubernetes.io/arch", arch),
                ("beta.kubernetes.io/os", "linux"),
                ("beta.kubernetes.io/arch", arch),
                ("topology.kubernetes.io/region", "eu-west-1"),
                ("topology.kubernetes.io/zone", zone),
                (
                    "node.kubernetes.io/instance-type",
                    INSTANCE_TYPES[index % INSTANCE_TYPES.len()],
                ),
                ("acme.io/pool", pool),
                ("acme.io/cost-center", "platform"),
            ]);
            let mut taints = Vec::new();
            if control_plane {
                node_labels.insert(
                    "node-role.kubernetes.io/control-plane".into(),
                    String::new(),
                );
                taints.push(taint(
                    "node-role.kubernetes.io/control-plane",
                    None,
                    "NoSchedule",
                ));
            }
            if gpu {
                node_labels.insert("nvidia.com/gpu.present".into(), "true".into());
                taints.push(taint("nvidia.com/gpu", Some("present"), "NoSchedule"));
            }
            if batch {
                taints.push(taint("dedicated", Some("batch"), "NoSchedule"));
                taints.push(taint("acme.io/spot", None, "PreferNoSchedule"));
            }
            NodeView {
                name,
                labels: node_labels,
                taints,
                ready: index % 97 != 50,
                unschedulable: index % 113 == 60,
                images: NodeImages::from_names(&reported_images(index)),
            }
        })
        .collect()
}

/// Ten workloads of five images each (one shared sidecar), with the
/// scheduling constraints real teams write.
fn workloads() -> Vec<WorkloadImages> {
    let linux = labels(&[("kubernetes.io/os", "linux")]);
    let scheduling: Vec<SchedulingConstraints> = vec![
        // 0: no constraints at all.
        SchedulingConstraints::default(),
        // 1: nodeSelector only.
        SchedulingConstraints {
            node_selector: linux.clone(),
            ..SchedulingConstraints::default()
        },
        // 2: batch pool, tolerates its taint.
        SchedulingConstraints {
            node_selector: labels(&[("acme.io/pool", "batch")]),
            tolerations: vec![toleration(
                "dedicated",
                "Equal",
                Some("batch"),
                Some("NoSchedule"),
            )],
            ..SchedulingConstraints::default()
        },
        // 3: two zones by required node affinity.
        SchedulingConstraints {
            required_node_affinity: Some(affinity(vec![vec![requirement(
                "topology.kubernetes.io/zone",
                "In",
                &["eu-west-1a", "eu-west-1b"],
            )]])),
            ..SchedulingConstraints::default()
        },
        // 4: amd64 and not the memory-optimised type; two ORed terms.
        SchedulingConstraints {
            required_node_affinity: Some(affinity(vec![
                vec![
                    requirement("kubernetes.io/arch", "In", &["amd64"]),
                    requirement(
                        "node.kubernetes.io/instance-type",
                        "NotIn",
                        &["r6i.2xlarge"],
                    ),
                ],
                vec![requirement("acme.io/pool", "In", &["batch"])],
            ])),
            ..SchedulingConstraints::default()
        },
        // 5: GPU nodes only.
        SchedulingConstraints {
            node_selector: labels(&[("nvidia.com/gpu.present", "true")]),
            tolerations: vec![toleration("nvidia.com/gpu", "Exists", None, None)],
            ..SchedulingConstraints::default()
        },
        // 6: DaemonSet-like: tolerates everything.
        SchedulingConstraints {
            tolerations: vec![Toleration {
                operator: Some("Exists".into()),
                ..Toleration::default()
            }],
            ..SchedulingConstraints::default()
        },
        // 7: affinity with Exists/DoesNotExist, plus the usual NoExecute
        // tolerations every pod gets from admission.
        SchedulingConstraints {
            node_selector: linux.clone(),
            required_node_affinity: Some(affinity(vec![vec![
                requirement("acme.io/cost-center", "Exists", &[]),
                requirement("nvidia.com/gpu.present", "DoesNotExist", &[]),
            ]])),
            tolerations: vec![
                toleration(
                    "node.kubernetes.io/not-ready",
                    "Exists",
                    None,
                    Some("NoExecute"),
                ),
                toleration(
                    "node.kubernetes.io/unreachable",
                    "Exists",
                    None,
                    Some("NoExecute"),
                ),
            ],
        },
        // 8: no constraints.
        SchedulingConstraints::default(),
        // 9: one instance type.
        SchedulingConstraints {
            node_selector: labels(&[("node.kubernetes.io/instance-type", "c6i.4xlarge")]),
            ..SchedulingConstraints::default()
        },
    ];
    scheduling
        .into_iter()
        .enumerate()
        .map(|(index, scheduling)| {
            let team = format!("team-{}", index % 5);
            let service = format!("service-{index}");
            let mut images: Vec<String> = (0..4)
                .map(|container| match (index + container) % 4 {
                    0 => format!("registry.example.com/{team}/{service}-c{container}:v1.{index}.0"),
                    1 => format!("{team}/{service}-c{container}:2.{index}"),
                    2 => format!(
                        "123456789012.dkr.ecr.eu-west-1.amazonaws.com/{team}/{service}-c{container}:{index}.0.{container}"
                    ),
                    _ => format!(
                        "ghcr.io/acme/{service}-c{container}@sha256:{:064x}",
                        index * 31 + container
                    ),
                })
                .collect();
            // The same sidecar in every workload: dedup keeps the first.
            images.push("docker.io/istio/proxyv2:1.24.1".to_string());
            WorkloadImages {
                kind: if index == 6 {
                    WorkloadKind::DaemonSet
                } else {
                    WorkloadKind::Deployment
                },
                namespace: team,
                name: service,
                images,
                scheduling,
                image_pull_secrets: vec!["registry-credentials".to_string()],
                service_account: Some(format!("sa-{index}")),
            }
        })
        .collect()
}

fn extras() -> ExtraImages {
    ExtraImages {
        images: Vec::new(),
        namespace: "platform".to_string(),
        image_pull_secrets: Vec::new(),
    }
}

fn targeting() -> NodeTargeting {
    NodeTargeting {
        node_filter: Some("worker".to_string()),
        node_selector: labels(&[("kubernetes.io/os", "linux")]),
        ..NodeTargeting::default()
    }
}

/// Exactly `nodes × images` pairs, every workload on every node: the size the
/// tracker benchmarks are stated in.
fn full_desired_set(node_count: usize, image_count: usize) -> DesiredSet {
    // One settings per source (team, service account), shared by its pairs
    // as the planner shares them.
    let settings: BTreeMap<(usize, usize), Arc<PullSettings>> = (0..image_count)
        .map(|image| {
            let settings = PullSettings {
                namespace: format!("team-{}", image % 5),
                image_pull_secrets: vec!["registry-credentials".to_string()],
                service_account: Some(format!("sa-{}", image / 5)),
                tolerations: Vec::new(),
            };
            ((image % 5, image / 5), Arc::new(settings))
        })
        .collect();
    // Image names shared by their pairs, as the planner shares them.
    let images: Vec<Arc<str>> = (0..image_count)
        .map(|image| {
            let name = format!(
                "registry.example.com/team-{}/service-{}:v1.{image}.0",
                image % 5,
                image / 5
            );
            Arc::from(name)
        })
        .collect();
    let mut desired = DesiredSet::default();
    desired.images = images.iter().map(|image| image.to_string()).collect();
    for node in 0..node_count {
        let node_name: Arc<str> = Arc::from(format!("prod-eu-1-worker-{node:05}"));
        let pairs = images
            .iter()
            .enumerate()
            .map(|(index, image)| {
                let shared = settings[&(index % 5, index / 5)].clone();
                PullTarget::new(node_name.clone(), image.clone(), shared)
            })
            .collect();
        desired.replace_node(&node_name, Some(pairs));
    }
    desired
}

/// A tracker in mid-rollout: of every 20 pairs 12 satisfied, 3 in flight,
/// 2 backing off after a transient failure, 1 permanently failed, 2 idle.
fn busy_tracker(desired: &DesiredSet, now: Instant) -> Tracker {
    let mut tracker = Tracker::new(BackoffPolicy::default());
    tracker.set_desired(desired);
    for (index, key) in desired.keys().enumerate() {
        let key = &key;
        let pod = format!("kube-prefetch-{index:040x}");
        match index % 20 {
            0..=11 => {
                tracker.on_dispatched(key, &pod, now);
                tracker.on_outcome(key, Outcome::Succeeded, now);
            }
            12..=14 => tracker.on_dispatched(key, &pod, now),
            15 | 16 => {
                tracker.on_dispatched(key, &pod, now);
                tracker.on_outcome(
                    key,
                    Outcome::Failed {
                        reason: "ErrImagePull".into(),
                        message: format!(
                            "failed to pull and unpack image \"{}\": i/o timeout",
                            key.image
                        ),
                        permanent: false,
                    },
                    now,
                );
            }
            17 => {
                tracker.on_dispatched(key, &pod, now);
                tracker.on_outcome(
                    key,
                    Outcome::Failed {
                        reason: "ErrImagePull".into(),
                        message: format!(
                            "failed to resolve reference \"{}\": not found",
                            key.image
                        ),
                        permanent: true,
                    },
                    now,
                );
            }
            _ => {}
        }
    }
    tracker
}

// ---------------------------------------------------------------------------

fn main() {
    // `cargo bench` passes `--bench`; any other non-flag argument filters.
    let filter = std::env::args().skip(1).find(|arg| !arg.starts_with('-'));
    let mut bench = Bench {
        filter,
        rows: Vec::new(),
        retained: Vec::new(),
    };
    eprintln!("kube-prefetch planning benchmarks (medians as they finish; table at the end)");

    // normalize: one call per reference, over a mix of forms.
    bench.run("normalize", REFERENCES.len(), "12 reference forms", || {
        REFERENCES
            .iter()
            .map(|reference| normalize(black_box(reference)))
            .collect::<Vec<_>>()
    });

    // node_has_image parses the node's names on every call; replan instead
    // asks the NodeImages index that NodeView builds once per node update.
    let busy_node = nodes(10).pop().expect("ten nodes");
    let busy_names = reported_images(9);
    let present = normalize(&busy_names[99]).expect("valid name");
    let absent = "docker.io/istio/proxyv2:1.24.1".to_string();
    bench.run(
        "node_has_image (100 names, absent)",
        1,
        "worst case: parses every name",
        || node_has_image(black_box(&busy_names), black_box(&absent)),
    );
    bench.run(
        "node_has_image (100 names, last)",
        1,
        "found at the end",
        || node_has_image(black_box(&busy_names), black_box(&present)),
    );
    bench.run(
        "NodeImages::contains (100 names, absent)",
        1,
        "index built once per node update",
        || busy_node.images.contains(black_box(&absent)),
    );
    bench.run(
        "NodeImages::from_names (100 names)",
        1,
        "on every node event",
        || NodeImages::from_names(black_box(&busy_names)),
    );

    // desired_pulls: one replan of one Prefetch.
    let workloads = workloads();
    let extra = extras();
    let targeting = targeting();
    for node_count in [50, 500, 5000] {
        let fleet = nodes(node_count);
        let (desired, bytes) =
            retained(|| desired_pulls(&fleet, &workloads, &extra, &targeting, true, false));
        let note = format!(
            "{} targeted nodes, {} pairs",
            desired.node_count(),
            desired.len()
        );
        bench.record_retained(
            &format!("DesiredSet, {node_count} nodes"),
            bytes,
            format!(
                "{note}: {} per pair",
                format_bytes(bytes as f64 / desired.len().max(1) as f64)
            ),
        );
        bench.run(
            &format!("desired_pulls {node_count} nodes x 10 workloads x 5 images"),
            1,
            &note,
            || {
                desired_pulls(
                    black_box(&fleet),
                    &workloads,
                    &extra,
                    &targeting,
                    true,
                    false,
                )
            },
        );
        bench.run(
            &format!("desired_pulls {node_count} nodes, tolerate_all_taints"),
            1,
            "one toleration per pair instead of copies",
            || {
                desired_pulls(
                    black_box(&fleet),
                    &workloads,
                    &extra,
                    &targeting,
                    true,
                    true,
                )
            },
        );
    }

    // Tracker at 25k pairs: 500 nodes x 50 images.
    let desired = full_desired_set(500, 50);
    let pairs = desired.len();
    let now = Instant::now();
    let (tracker, bytes) = retained(|| busy_tracker(&desired, now));
    bench.record_retained(
        "Tracker, 25k pairs (mid-rollout)",
        bytes,
        format!("{} per pair", format_bytes(bytes as f64 / pairs as f64)),
    );
    // Issue 7's fleet: 20 Prefetches x 5 images on 1,000 workers, every
    // pair satisfied (READY), the nodes shared by all Prefetches as the
    // cluster's index shares them. What one more 1,000 nodes costs.
    let fleet_nodes: Vec<NodeView> = (0..1000)
        .map(|index| NodeView {
            name: format!("sim-1-worker{index}"),
            ready: true,
            ..NodeView::default()
        })
        .collect();
    let ((fleet_pairs, fleet_state), bytes) = retained(|| {
        let mut pairs = 0;
        let mut state = Vec::new();
        for prefetch in 0..20 {
            let workload = WorkloadImages {
                kind: WorkloadKind::Deployment,
                namespace: format!("team-{prefetch}"),
                name: format!("app-{prefetch}"),
                images: (0..5)
                    .map(|image| {
                        format!("registry.example/fleet/app-{}:1", (prefetch + image) % 10)
                    })
                    .collect(),
                scheduling: SchedulingConstraints::default(),
                image_pull_secrets: vec!["registry-credentials".to_string()],
                service_account: None,
            };
            let planner = Planner::new(
                [workload].iter(),
                &extras(),
                NodeTargeting {
                    node_filter: Some("worker".to_string()),
                    ..NodeTargeting::default()
                },
                true,
                false,
            );
            let desired = planner.plan(fleet_nodes.iter());
            let mut tracker = Tracker::new(BackoffPolicy::default());
            tracker.set_desired(&desired);
            for key in desired.keys() {
                tracker.node_reports_image(&key, now);
            }
            pairs += desired.len();
            state.push((desired, tracker));
        }
        (pairs, state)
    });
    bench.record_retained(
        "DesiredSet + Tracker, 20 Prefetches x 1,000 nodes x 5 images (READY)",
        bytes,
        format!(
            "{fleet_pairs} pairs: {} per pair",
            format_bytes(bytes as f64 / fleet_pairs.max(1) as f64)
        ),
    );
    drop(fleet_state);
    let (node_views, bytes) = retained(|| nodes(1000));
    bench.record_retained(
        "NodeView, 1,000 nodes x 50 images (100 names)",
        bytes,
        format!(
            "{} per node, 11 labels and the image index",
            format_bytes(bytes as f64 / node_views.len() as f64)
        ),
    );
    drop(node_views);
    bench.run_with_setup(
        "Tracker::set_desired 25k, first time",
        1,
        "every pair new",
        || Tracker::new(BackoffPolicy::default()),
        |fresh| fresh.set_desired(black_box(&desired)),
    );
    bench.run_with_setup(
        "Tracker::set_desired 25k, unchanged",
        1,
        "a replan that changes nothing",
        || tracker.clone(),
        |busy| busy.set_desired(black_box(&desired)),
    );
    let later = now + Duration::from_secs(30);
    let retry_after = Duration::from_secs(300);
    let due = tracker.due(later, retry_after);
    bench.run(
        "Tracker::due 25k",
        1,
        &format!("{} due (idle + backoff over)", due.len()),
        || tracker.due(black_box(later), retry_after),
    );
    bench.run("Tracker::counts 25k", 1, "", || tracker.counts());
    let failing = pairs * 3 / 20;
    bench.run(
        "Tracker::failures 25k",
        1,
        &format!("{failing} failing pairs, newest 20 kept"),
        || tracker.failures(),
    );
    bench.run("Tracker::in_flight_count 25k", 1, "", || {
        tracker.in_flight_count()
    });
    bench.run(
        "due + DispatchQueue::grant 25k, 100 slots",
        1,
        "one dispatch round: due, 400 candidates, grant",
        || {
            let mut due = tracker.due(black_box(later), retry_after);
            due.truncate(400);
            let mut queue = DispatchQueue::new(1, 100);
            queue.request("prefetch", "ns", due, 100);
            queue.grant()
        },
    );
    // The node names of `full_desired_set`, with a busy node's reported
    // images each.
    let node_views: BTreeMap<String, NodeView> = nodes(500)
        .into_iter()
        .enumerate()
        .map(|(index, mut node)| {
            node.name = format!("prod-eu-1-worker-{index:05}");
            (node.name.clone(), node)
        })
        .collect();
    let keys: Vec<PairKey> = desired.keys().collect();
    bench.run(
        "replan image check 25k pairs",
        pairs,
        "NodeImages::contains per pair, as replan does",
        || {
            keys.iter()
                .filter(|key| {
                    node_views
                        .get(&*key.node)
                        .is_some_and(|node| node.images.contains(&key.image))
                })
                .count()
        },
    );

    // One whole replan of a 500-node cluster, step by step as
    // PrefetchActor::replan does it: copy the node and workload views, plan,
    // update the tracker, then ask every pair's node whether it reports the
    // image.
    let fleet: BTreeMap<String, NodeView> = nodes(500)
        .into_iter()
        .map(|node| (node.name.clone(), node))
        .collect();
    let plan_once = || {
        desired_pulls(
            &fleet.values().cloned().collect::<Vec<_>>(),
            &workloads,
            &extra,
            &targeting,
            true,
            false,
        )
    };
    let mut replan_tracker = busy_tracker(&plan_once(), now);
    // Let the in-flight pairs finish so the replan sees a settled state.
    for (key, _) in replan_tracker.in_flight() {
        replan_tracker.on_outcome(&key, Outcome::Succeeded, now);
    }
    let replan_pairs = plan_once().len();
    bench.run_with_setup(
        "replan 500 nodes, whole",
        1,
        &format!("{replan_pairs} pairs: clone views, plan, track, image check"),
        || replan_tracker.clone(),
        |tracker| {
            let node_list: Vec<NodeView> = fleet.values().cloned().collect();
            let workload_list: Vec<WorkloadImages> = workloads.to_vec();
            let desired =
                desired_pulls(&node_list, &workload_list, &extra, &targeting, true, false);
            tracker.set_desired(&desired);
            let in_flight: BTreeSet<PairKey> = tracker
                .in_flight()
                .into_iter()
                .map(|(key, _)| key)
                .collect();
            for key in desired.keys() {
                let reported = fleet
                    .get(&*key.node)
                    .is_some_and(|node| node.images.contains(&key.image));
                if reported && !in_flight.contains(&key) {
                    tracker.node_reports_image(&key, later);
                }
            }
            desired
        },
    );

    // What a node event costs now: that node's pairs alone, as
    // PrefetchActor::replan does it for a dirty node.
    let planner = Planner::new(workloads.iter(), &extra, targeting.clone(), true, false);
    let node_list: Vec<NodeView> = fleet.values().cloned().collect();
    let settled = planner.plan(node_list.iter());
    let mut node_tracker = replan_tracker.clone();
    node_tracker.set_desired(&settled);
    let changed = node_list.get(node_list.len() / 2).cloned().expect("a node");
    bench.run_with_setup(
        "replan 500 nodes, one node event",
        1,
        "plan the node, replace its pairs, track, image check",
        || (settled.clone(), node_tracker.clone()),
        |(desired, tracker)| {
            let plan = planner.plan_node(black_box(&changed));
            desired.replace_node(&changed.name, plan);
            tracker.set_node_desired(&changed.name, desired);
            let keys: Vec<PairKey> = desired.node_keys(&changed.name).collect();
            for key in &keys {
                if changed.images.contains(&key.image) {
                    tracker.node_reports_image(key, later);
                }
            }
        },
    );

    // build_pull_pod: one pod per dispatched pair.
    let target = desired
        .targets()
        .next()
        .map(|mut target| {
            Arc::make_mut(&mut target.settings).tolerations = vec![
                toleration("dedicated", "Equal", Some("batch"), Some("NoSchedule")),
                toleration(
                    "node.kubernetes.io/not-ready",
                    "Exists",
                    None,
                    Some("NoExecute"),
                ),
            ];
            target
        })
        .expect("a pair");
    bench.run("build_pull_pod", 1, "2 tolerations, 1 secret", || {
        build_pull_pod(&PullPodParams {
            prefetch_namespace: "team-0",
            prefetch_name: "warm-payments",
            prefetch_uid: "6f1c2a4e-8b3d-4f7a-9c1e-2d5b7a9e0f13",
            target: black_box(&target),
            method: PullMethod::Helper,
            helper_image: "ghcr.io/kube-prefetch/kube-prefetch-noop:0.1.0",
            timeout_seconds: 600,
            priority_class: Some("kube-prefetch-low"),
        })
    });

    bench.print();
}
