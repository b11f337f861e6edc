//! Image references: parsing into one canonical, fully qualified form, and
//! matching against what the kubelet reports in `node.status.images`.
//!
//! The canonical form is `registry/repository[:tag][@digest]`, with the
//! Docker Hub defaults made explicit (`docker.io`, `library/`, `:latest`), so
//! that `nginx`, `docker.io/nginx` and `index.docker.io/library/nginx:latest`
//! are one and the same pair key.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex};

use crate::names::quoted;

/// The Docker Hub registry as it appears in canonical references.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The legacy Docker Hub host, folded into [`DEFAULT_REGISTRY`].
const LEGACY_DEFAULT_REGISTRY: &str = "index.docker.io";
/// Namespace of official Docker Hub images (`nginx` -> `library/nginx`).
const OFFICIAL_NAMESPACE: &str = "library";
const DEFAULT_TAG: &str = "latest";
/// Distribution's limit on `registry/repository`.
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {}: {reason}", quoted(reference))]
pub struct ImageRefError {
    pub reference: String,
    pub reason: String,
}

/// A parsed, normalised image reference. `Display` gives the canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// Lower-cased registry host with optional port, e.g. `docker.io`, `localhost:5000`.
    pub registry: String,
    /// Repository path, e.g. `library/nginx`.
    pub repository: String,
    /// Tag; `latest` is filled in only when neither tag nor digest was given.
    pub tag: Option<String>,
    /// `algorithm:hex`.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses and normalises `reference` (see [`normalize`] for the rules).
    pub fn parse(reference: &str) -> Result<Self, ImageRefError> {
        let fail = |reason: &str| ImageRefError {
            reference: reference.to_string(),
            reason: reason.to_string(),
        };
        let trimmed = reference.trim();
        if trimmed.is_empty() {
            return Err(fail("empty reference"));
        }
        if trimmed.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(fail("contains whitespace or control characters"));
        }

        // The digest is everything after the first '@'; the tag is after the
        // last ':' that follows the last '/' (a ':' before it is a port).
        let (name_and_tag, digest) = match trimmed.split_once('@') {
            Some((name, digest)) => (name, Some(digest)),
            None => (trimmed, None),
        };
        if let Some(digest) = digest {
            validate_digest(digest).map_err(|reason| fail(&reason))?;
        }
        let last_slash = name_and_tag.rfind('/');
        let (name, tag) = match name_and_tag.rfind(':') {
            Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
                (&name_and_tag[..colon], Some(&name_and_tag[colon + 1..]))
            }
            _ => (name_and_tag, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag).map_err(|reason| fail(&reason))?;
        }
        if name.is_empty() {
            return Err(fail("missing repository name"));
        }

        // The first component names a registry only if it looks like a host;
        // `myuser/app` is a Docker Hub repository, as Docker itself decides.
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                validate_registry(first).map_err(|reason| fail(&reason))?;
                (first.to_ascii_lowercase(), rest)
            }
            _ => (DEFAULT_REGISTRY.to_string(), name),
        };
        let registry = if registry == LEGACY_DEFAULT_REGISTRY {
            DEFAULT_REGISTRY.to_string()
        } else {
            registry
        };
        validate_repository(path).map_err(|reason| fail(&reason))?;
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("{OFFICIAL_NAMESPACE}/{path}")
        } else {
            path.to_string()
        };
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(fail(&format!("name longer than {MAX_NAME_LEN} characters")));
        }

        let tag = match (tag, digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (tag, _) => tag.map(str::to_string),
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest: digest.map(str::to_string),
        })
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Canonical, fully qualified form `registry/repository[:tag][@digest]`.
///
/// Defaults: registry `docker.io` (`index.docker.io` folds into it), the
/// `library/` namespace for single-component Docker Hub names, and `:latest`
/// when neither tag nor digest is given. A tag and a digest given together
/// are both kept. Repository, tag and digest follow the distribution spec.
pub fn normalize(reference: &str) -> Result<String, ImageRefError> {
    ImageRef::parse(reference).map(|image| image.to_string())
}

/// Whether a node's reported image names (`status.images[].names`) include
/// `wanted_canonical`.
///
/// Every name is normalised first and compared whole, never as a substring.
/// A wanted digest also matches a reported `repository@digest` with the same
/// repository (the kubelet reports digests without tags), and a wanted tag
/// also matches a reported `repository:tag@digest`. Unparseable names never
/// match. Note: the kubelet reports at most 50 images per node, so `false`
/// does not prove the image is absent.
pub fn node_has_image(node_image_names: &[String], wanted_canonical: &str) -> bool {
    NodeImages::from_names(node_image_names).contains(wanted_canonical)
}

/// The images one node reports, parsed once: planning asks "does this node
/// have that image?" for every pair, and parsing the node's (up to 50 × a
/// few) names on each question dominated a replan.
///
/// Memory: a cluster of thousands of nodes reports mostly the same images,
/// so each node keeps only shared names (see [`shared_name`]): 16 bytes per
/// reported name, where owned strings cost about 200.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeImages {
    /// `registry/repository:tag` of every reported name with a tag and
    /// `registry/repository@digest` of every one with a digest, sorted and
    /// without duplicates. A registry has no `/` and a repository no `:` or
    /// `@`, so two different images never give the same key.
    keys: Box<[Arc<str>]>,
}

impl NodeImages {
    /// Names that do not parse are ignored: the kubelet reports what the
    /// runtime has, which we never want to fail on.
    pub fn from_names(names: &[String]) -> Self {
        let mut keys: Vec<Arc<str>> = Vec::new();
        for reported in names.iter().filter_map(|name| ImageRef::parse(name).ok()) {
            if let Some(tag) = &reported.tag {
                keys.push(shared_name(tag_key(&reported, tag)));
            }
            if let Some(digest) = &reported.digest {
                keys.push(shared_name(digest_key(&reported, digest)));
            }
        }
        keys.sort();
        keys.dedup();
        NodeImages {
            keys: keys.into_boxed_slice(),
        }
    }

    /// Whether a reported name satisfies `wanted`: a digest pins the content,
    /// so the same digest is the same image whatever tag either side names;
    /// otherwise the same repository and tag. Never a substring match.
    pub fn contains(&self, wanted_canonical: &str) -> bool {
        let Ok(wanted) = ImageRef::parse(wanted_canonical) else {
            return false;
        };
        let key = match (&wanted.digest, &wanted.tag) {
            (Some(digest), _) => digest_key(&wanted, digest),
            (None, Some(tag)) => tag_key(&wanted, tag),
            (None, None) => return false,
        };
        self.keys
            .binary_search_by(|known| (**known).cmp(key.as_str()))
            .is_ok()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// How many distinct (repository, tag) and (repository, digest) keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }
}

fn tag_key(image: &ImageRef, tag: &str) -> String {
    format!("{}/{}:{tag}", image.registry, image.repository)
}

fn digest_key(image: &ImageRef, digest: &str) -> String {
    format!("{}/{}@{digest}", image.registry, image.repository)
}

/// Image names shared by every node of the process that reports them.
struct SharedNames {
    names: HashSet<Arc<str>>,
    /// Names no node holds any more are dropped when the table reaches this
    /// size, which then becomes twice what is left: the table stays within
    /// twice the names in use, at an amortised constant cost per insert.
    prune_at: usize,
}

static SHARED_NAMES: LazyLock<Mutex<SharedNames>> = LazyLock::new(|| {
    Mutex::new(SharedNames {
        names: HashSet::new(),
        prune_at: 1024,
    })
});

/// One allocation per distinct name, shared by every caller that asks for
/// it. Process-wide rather than per cluster: clusters report the same
/// images too, and what is shared changes no result, only memory.
fn shared_name(name: String) -> Arc<str> {
    // A panic elsewhere while holding the lock leaves the table usable.
    let mut table = SHARED_NAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(known) = table.names.get(name.as_str()) {
        return known.clone();
    }
    if table.names.len() >= table.prune_at {
        table.names.retain(|known| Arc::strong_count(known) > 1);
        table.prune_at = (table.names.len() * 2).max(1024);
    }
    let shared: Arc<str> = Arc::from(name);
    table.names.insert(shared.clone());
    shared
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn validate_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() {
        return Err("empty tag".into());
    }
    if tag.len() > MAX_TAG_LEN {
        return Err(format!("tag longer than {MAX_TAG_LEN} characters"));
    }
    let mut chars = tag.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    if !first_ok {
        return Err(format!(
            "tag {} must start with a letter, digit or '_'",
            quoted(tag)
        ));
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Err(format!(
            "tag {} may contain only letters, digits, '_', '.' and '-'",
            quoted(tag)
        ));
    }
    Ok(())
}

/// `algorithm:encoded` per the OCI image spec; the registered algorithms
/// (sha256, sha512) must have exactly their length of lowercase hex.
fn validate_digest(digest: &str) -> Result<(), String> {
    let Some((algorithm, encoded)) = digest.split_once(':') else {
        return Err(format!("digest {} must be algorithm:hex", quoted(digest)));
    };
    let algorithm_ok = !algorithm.is_empty()
        && algorithm
            .split(['+', '.', '_', '-'])
            .all(|part| !part.is_empty() && part.chars().all(is_lower_alnum));
    if !algorithm_ok {
        return Err(format!("invalid digest algorithm {}", quoted(algorithm)));
    }
    let hex_len = match algorithm {
        "sha256" => Some(64),
        "sha512" => Some(128),
        _ => None,
    };
    match hex_len {
        Some(len) => {
            let hex_ok = encoded.len() == len
                && encoded
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
            if !hex_ok {
                return Err(format!(
                    "{algorithm} digest must be {len} lowercase hex characters"
                ));
            }
        }
        None => {
            let encoded_ok = !encoded.is_empty()
                && encoded
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '=' | '_' | '-'));
            if !encoded_ok {
                return Err(format!("invalid digest value {}", quoted(encoded)));
            }
        }
    }
    Ok(())
}

/// `host[:port]`, host being DNS labels or a bracketed IPv6 address.
fn validate_registry(registry: &str) -> Result<(), String> {
    let (host_ok, port) = match registry.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((address, after)) => {
                let address_ok = !address.is_empty()
                    && address.chars().all(|c| c.is_ascii_hexdigit() || c == ':');
                match after {
                    "" => (address_ok, None),
                    _ => (address_ok, Some(after.strip_prefix(':').unwrap_or(after))),
                }
            }
            None => (false, None),
        },
        None => match registry.split_once(':') {
            Some((host, port)) => (is_dns_name(host), Some(port)),
            None => (is_dns_name(registry), None),
        },
    };
    let port_ok =
        port.is_none_or(|port| !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()));
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(format!("invalid registry host {}", quoted(registry)))
    }
}

/// Labels of letters, digits and inner hyphens, separated by dots.
fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// Path components of lowercase alphanumerics joined by `.`, `_`, `__` or
/// runs of `-`, separated by `/`.
fn validate_repository(path: &str) -> Result<(), String> {
    if path.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!("repository {} must be lowercase", quoted(path)));
    }
    for component in path.split('/') {
        if component.is_empty() {
            return Err(format!(
                "repository {} has an empty path component",
                quoted(path)
            ));
        }
        if !is_path_component(component) {
            return Err(format!(
                "repository component {} must be lowercase letters and digits \
                 separated by '.', '_', '__' or '-'",
                quoted(component)
            ));
        }
    }
    Ok(())
}

fn is_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let mut i = 0;
    let mut expect_alnum = true;
    while i < bytes.len() {
        let start = i;
        if is_lower_alnum(char::from(bytes[i])) {
            while i < bytes.len() && is_lower_alnum(char::from(bytes[i])) {
                i += 1;
            }
            expect_alnum = false;
        } else {
            if expect_alnum {
                // Leading separator or two separators in a row.
                return false;
            }
            while i < bytes.len() && !is_lower_alnum(char::from(bytes[i])) {
                i += 1;
            }
            let separator = &component[start..i];
            let separator_ok =
                matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
            if !separator_ok {
                return false;
            }
            expect_alnum = true;
        }
    }
    // Must not end with a separator (and must not be empty).
    !expect_alnum
}

fn is_lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX64: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn ok(reference: &str) -> String {
        match normalize(reference) {
            Ok(canonical) => canonical,
            Err(err) => panic!("{reference:?} should be valid: {err}"),
        }
    }

    fn err(reference: &str) -> ImageRefError {
        match normalize(reference) {
            Ok(canonical) => panic!("{reference:?} should be invalid, got {canonical}"),
            Err(err) => err,
        }
    }

    #[test]
    fn normalisation_table() {
        let cases = [
            ("nginx:1.7.9", "docker.io/library/nginx:1.7.9".to_string()),
            ("nginx", "docker.io/library/nginx:latest".to_string()),
            ("  nginx  ", "docker.io/library/nginx:latest".to_string()),
            ("myuser/app:v1", "docker.io/myuser/app:v1".to_string()),
            (
                "docker.io/nginx",
                "docker.io/library/nginx:latest".to_string(),
            ),
            (
                "docker.io/library/nginx:1.25",
                "docker.io/library/nginx:1.25".to_string(),
            ),
            (
                "index.docker.io/nginx:1",
                "docker.io/library/nginx:1".to_string(),
            ),
            (
                "index.docker.io/myuser/app",
                "docker.io/myuser/app:latest".to_string(),
            ),
            (
                "localhost:5000/app",
                "localhost:5000/app:latest".to_string(),
            ),
            ("localhost/app:dev", "localhost/app:dev".to_string()),
            (
                "localhost",
                "docker.io/library/localhost:latest".to_string(),
            ),
            (
                "registry.k8s.io/pause:3.10",
                "registry.k8s.io/pause:3.10".to_string(),
            ),
            ("Quay.IO/org/app:v1", "quay.io/org/app:v1".to_string()),
            ("ghcr.io/a/b/c/d:x", "ghcr.io/a/b/c/d:x".to_string()),
            ("fail.invalid/x:1", "fail.invalid/x:1".to_string()),
            ("[::1]:5000/app:v1", "[::1]:5000/app:v1".to_string()),
            (
                "my-registry.local:5000/team/app:1.2.3-rc.1",
                "my-registry.local:5000/team/app:1.2.3-rc.1".to_string(),
            ),
            (
                &format!("ghcr.io/org/x@sha256:{HEX64}"),
                format!("ghcr.io/org/x@sha256:{HEX64}"),
            ),
            (
                &format!("nginx@sha256:{HEX64}"),
                format!("docker.io/library/nginx@sha256:{HEX64}"),
            ),
            (
                &format!("nginx:1.25@sha256:{HEX64}"),
                format!("docker.io/library/nginx:1.25@sha256:{HEX64}"),
            ),
            (
                "a__b/c-d/e.f_g:_T.a-G",
                "docker.io/a__b/c-d/e.f_g:_T.a-G".to_string(),
            ),
            ("a---b:1", "docker.io/library/a---b:1".to_string()),
        ];
        for (input, expected) in cases {
            assert_eq!(ok(input), expected, "input {input:?}");
        }
    }

    #[test]
    fn normalisation_is_idempotent() {
        for input in [
            "nginx",
            "myuser/app:v1",
            "localhost:5000/app",
            "ghcr.io/x/y:z",
        ] {
            let once = ok(input);
            assert_eq!(ok(&once), once);
        }
    }

    #[test]
    fn invalid_references_give_reasons() {
        let cases = [
            ("", "empty"),
            ("   ", "empty"),
            ("Nginx", "lowercase"),
            ("myUser/app", "lowercase"),
            ("ghcr.io/Org/app", "lowercase"),
            ("ngi nx", "whitespace"),
            ("nginx:", "empty tag"),
            ("nginx:-bad", "must start"),
            ("nginx:bad/tag", "registry"),
            ("[::1]x/app", "registry"),
            ("[zz]:5000/app", "registry"),
            ("nginx:a+b", "may contain only"),
            ("nginx@", "algorithm:hex"),
            ("nginx@sha256:abc", "64 lowercase hex"),
            ("nginx@sha256:ABCDEF", "64 lowercase hex"),
            ("nginx@SHA256:abc", "algorithm"),
            ("-nginx", "repository component"),
            ("nginx-", "repository component"),
            ("a..b", "repository component"),
            ("a___b", "repository component"),
            ("a/_b", "repository component"),
            ("a//b", "empty path component"),
            ("ghcr.io/", "empty path component"),
            (":tag", "missing repository"),
            ("bad_host.io:x/app", "registry"),
            ("-bad.io/app", "registry"),
        ];
        for (input, reason) in cases {
            let error = err(input);
            assert_eq!(error.reference, input);
            assert!(
                error.reason.contains(reason),
                "{input:?}: reason {:?} should mention {reason:?}",
                error.reason
            );
        }
        assert!(normalize(&format!("nginx:{}", "t".repeat(129))).is_err());
        assert!(normalize(&format!("nginx:{}", "t".repeat(128))).is_ok());
        assert!(normalize(&format!("ghcr.io/{}", "a".repeat(250))).is_err());
    }

    /// 256 such references end up in one status: each message stays short.
    #[test]
    fn long_references_are_quoted_short() {
        let long = format!("Registry.example/{}", "A".repeat(4096));
        let error = err(&long);
        assert_eq!(error.reference, long, "the full reference is kept");
        assert_eq!(
            error.to_string(),
            format!(
                "invalid image reference \"Registry.example/{}\"... (4113 characters): repository \"{}\"... (4096 characters) must be lowercase",
                "A".repeat(83),
                "A".repeat(100)
            )
        );
        let garbage = "x".repeat(4096) + " y";
        assert!(err(&garbage).to_string().len() < 200);
    }

    #[test]
    fn error_display_names_the_reference() {
        let error = err("Bad");
        assert_eq!(
            error.to_string(),
            "invalid image reference \"Bad\": repository \"Bad\" must be lowercase"
        );
    }

    #[test]
    fn sha512_and_other_digest_algorithms() {
        let hex128 = HEX64.repeat(2);
        assert!(normalize(&format!("x@sha512:{hex128}")).is_ok());
        assert!(normalize(&format!("x@sha512:{HEX64}")).is_err());
        assert!(normalize("x@blake3+b64:Zm9v_-=").is_ok());
        assert!(normalize("x@sha256+:abc").is_err());
    }

    #[test]
    fn parse_exposes_parts() {
        let image = ImageRef::parse("localhost:5000/team/app:v2").expect("valid");
        assert_eq!(image.registry, "localhost:5000");
        assert_eq!(image.repository, "team/app");
        assert_eq!(image.tag.as_deref(), Some("v2"));
        assert_eq!(image.digest, None);
        assert_eq!(image.name(), "localhost:5000/team/app");
        let digest_only = ImageRef::parse(&format!("app@sha256:{HEX64}")).expect("valid");
        assert_eq!(digest_only.tag, None, "no :latest when a digest is given");
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|name| name.to_string()).collect()
    }

    /// Nodes reporting one image in different spellings keep one name.
    #[test]
    fn nodes_reporting_the_same_image_share_its_name() {
        let a = NodeImages::from_names(&names(&["nginx:1.7.9", "nginx:1.7.9"]));
        let b = NodeImages::from_names(&names(&["docker.io/library/nginx:1.7.9"]));
        assert_eq!(a, b);
        assert_eq!(a.len(), 1);
        assert!(Arc::ptr_eq(&a.keys[0], &b.keys[0]));
    }

    /// Names no node holds any more do not pile up in the shared table.
    #[test]
    fn the_shared_names_table_forgets_names_nobody_holds() {
        for round in 0..5000 {
            let once = NodeImages::from_names(&[format!("churn/image-{round}:1")]);
            assert!(once.contains(&format!("docker.io/churn/image-{round}:1")));
        }
        let size = SHARED_NAMES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .names
            .len();
        // At most twice what other tests hold at this moment, or 1,024.
        assert!(size <= 2048 + 500, "{size} names kept");
    }

    #[test]
    fn node_image_exact_match_after_normalising() {
        let wanted = ok("nginx:1.7.9");
        assert!(node_has_image(&names(&["nginx:1.7.9"]), &wanted));
        assert!(node_has_image(
            &names(&["docker.io/library/nginx:1.7.9"]),
            &wanted
        ));
        assert!(node_has_image(
            &names(&["index.docker.io/library/nginx:1.7.9"]),
            &wanted
        ));
        assert!(node_has_image(
            &names(&[
                "registry.k8s.io/pause:3.10",
                "docker.io/library/nginx:1.7.9"
            ]),
            &wanted
        ));
        assert!(node_has_image(&names(&["nginx"]), &ok("nginx:latest")));
    }

    #[test]
    fn node_image_never_matches_substrings() {
        let wanted = ok("nginx:1.7.9");
        for other in [
            "nginx:1.7.90",
            "nginx:1.7",
            "mynginx:1.7.9",
            "docker.io/library/nginx-extra:1.7.9",
            "ghcr.io/library/nginx:1.7.9",
            "docker.io/other/nginx:1.7.9",
            "nginx",
        ] {
            assert!(
                !node_has_image(&names(&[other]), &wanted),
                "{other} must not match"
            );
        }
        assert!(!node_has_image(&[], &wanted));
    }

    #[test]
    fn node_image_digest_match() {
        let other_hex = HEX64.replace('0', "f");
        let wanted = ok(&format!("ghcr.io/org/x:v1@sha256:{HEX64}"));
        assert!(node_has_image(
            &names(&[&format!("ghcr.io/org/x@sha256:{HEX64}")]),
            &wanted
        ));
        assert!(!node_has_image(
            &names(&[&format!("ghcr.io/org/x@sha256:{other_hex}")]),
            &wanted
        ));
        assert!(!node_has_image(
            &names(&[&format!("ghcr.io/org/y@sha256:{HEX64}")]),
            &wanted
        ));
        // A tag alone cannot prove the pinned content is there.
        assert!(!node_has_image(&names(&["ghcr.io/org/x:v1"]), &wanted));

        let by_digest = ok(&format!("nginx@sha256:{HEX64}"));
        assert!(node_has_image(
            &names(&[&format!("docker.io/library/nginx@sha256:{HEX64}")]),
            &by_digest
        ));
        assert!(node_has_image(
            &names(&[&format!("nginx:1.25@sha256:{HEX64}")]),
            &by_digest
        ));
    }

    #[test]
    fn node_image_tag_with_reported_digest() {
        let wanted = ok("nginx:1.25");
        assert!(node_has_image(
            &names(&[&format!("nginx:1.25@sha256:{HEX64}")]),
            &wanted
        ));
        assert!(!node_has_image(
            &names(&[&format!("nginx:1.26@sha256:{HEX64}")]),
            &wanted
        ));
    }

    #[test]
    fn node_image_ignores_garbage() {
        assert!(!node_has_image(&names(&["", "Not Valid"]), &ok("nginx")));
        assert!(!node_has_image(&names(&["nginx"]), "Not Valid"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// References shaped like real ones (registry, path, tag, digest),
        /// so that most parse and idempotence is really exercised.
        fn reference_like() -> impl Strategy<Value = String> {
            (
                prop::option::of("(localhost|index\\.docker\\.io|docker\\.io|[a-zA-Z0-9]([a-zA-Z0-9-]{0,6}[a-zA-Z0-9])?\\.[a-z]{2,3})(:[0-9]{1,5})?"),
                "[a-z0-9]{1,6}([._-][a-z0-9]{1,4})?(/[a-z0-9]{1,6}([_-][a-z0-9]{1,3})?){0,2}",
                prop::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,12}"),
                prop::option::of("(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})"),
            )
                .prop_map(|(registry, path, tag, digest)| {
                    let mut reference = String::new();
                    if let Some(registry) = registry {
                        reference.push_str(&registry);
                        reference.push('/');
                    }
                    reference.push_str(&path);
                    if let Some(tag) = tag {
                        reference.push(':');
                        reference.push_str(&tag);
                    }
                    if let Some(digest) = digest {
                        reference.push('@');
                        reference.push_str(&digest);
                    }
                    reference
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Any text: no panic, and a canonical form is its own
            /// canonical form.
            #[test]
            fn normalise_never_panics_and_is_idempotent(
                reference in prop_oneof![reference_like(), "[ -~]{0,40}", any::<String>()]
            ) {
                if let Ok(canonical) = normalize(&reference) {
                    prop_assert_eq!(normalize(&canonical), Ok(canonical.clone()));
                    // And a node reporting it has it.
                    prop_assert!(node_has_image(std::slice::from_ref(&canonical), &canonical));
                }
            }

            /// Every well-formed reference parses, to a fully qualified
            /// form keeping its tag and digest.
            #[test]
            fn well_formed_references_parse(reference in reference_like()) {
                let canonical = normalize(&reference);
                prop_assert!(canonical.is_ok(), "{}: {:?}", reference, canonical);
                let canonical = canonical.unwrap_or_default();
                if let Some((_, digest)) = reference.split_once('@') {
                    prop_assert!(canonical.ends_with(&format!("@{digest}")), "{}", canonical);
                }
                let registry = canonical.split('/').next().unwrap_or_default();
                prop_assert!(registry.contains('.') || registry.starts_with("localhost"), "{}", canonical);
            }
        }
    }
}
