//! Which namespaces a Prefetch may use besides its own: a Prefetch that
//! lists other `namespaces` reads their workloads and creates pull pods
//! there, with their pull secrets and service accounts, so the target
//! namespace decides. Its annotation [`PREFETCH_FROM_ANNOTATION`] names the
//! Prefetch namespaces it accepts (comma-separated, or `*` for all, empty
//! for none); without the annotation, `policy.cross_namespace` decides.

use std::collections::{BTreeMap, BTreeSet};

use crate::names::quoted;

/// The annotation of a target namespace naming who may prefetch into it.
pub const PREFETCH_FROM_ANNOTATION: &str = "cache.techsquad.rocks/prefetch-from";

/// What one namespace's annotation allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    any: bool,
    from: BTreeSet<String>,
    /// The annotation as written, for messages.
    written: String,
}

impl Access {
    pub fn parse(value: &str) -> Access {
        let names: BTreeSet<String> = value
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::to_string)
            .collect();
        Access {
            any: names.contains("*"),
            from: names,
            written: value.to_string(),
        }
    }

    fn allows(&self, from: &str) -> bool {
        self.any || self.from.contains(from)
    }
}

/// The cross-namespace rules of one cluster: the global switch and each
/// namespace's annotation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespacePolicy {
    /// `policy.cross_namespace`: for namespaces without the annotation.
    pub global: bool,
    annotated: BTreeMap<String, Access>,
}

impl NamespacePolicy {
    pub fn new(global: bool) -> Self {
        NamespacePolicy {
            global,
            annotated: BTreeMap::new(),
        }
    }

    /// Records namespace `name`'s annotation (`None`: it has none). Returns
    /// whether anything changed.
    pub fn set(&mut self, name: &str, annotation: Option<&str>) -> bool {
        let access = annotation.map(Access::parse);
        if self.annotated.get(name) == access.as_ref() {
            return false;
        }
        match access {
            Some(access) => self.annotated.insert(name.to_string(), access),
            None => self.annotated.remove(name),
        };
        true
    }

    /// Replaces every annotation at once (after a full list).
    pub fn replace_all<'a>(
        &mut self,
        annotations: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> bool {
        let annotated: BTreeMap<String, Access> = annotations
            .into_iter()
            .map(|(name, value)| (name.to_string(), Access::parse(value)))
            .collect();
        let changed = annotated != self.annotated;
        self.annotated = annotated;
        changed
    }

    /// Whether a Prefetch in namespace `from` may use namespace `target`.
    pub fn allows(&self, from: &str, target: &str) -> bool {
        from == target
            || match self.annotated.get(target) {
                Some(access) => access.allows(from),
                None => self.global,
            }
    }

    /// Why a Prefetch in `from` may not use each of `refused`: the status
    /// message, `None` when nothing is refused.
    pub fn refusal(&self, from: &str, refused: &[String]) -> Option<String> {
        if refused.is_empty() {
            return None;
        }
        let reasons: Vec<String> = refused
            .iter()
            .map(|target| match self.annotated.get(target) {
                Some(access) => format!(
                    "namespace {target} refused: its annotation {PREFETCH_FROM_ANNOTATION} = {} does not name {from}",
                    quoted(&access.written)
                ),
                None => format!(
                    "namespace {target} refused: cross-namespace prefetching is disabled by policy (policy.cross_namespace = false) and the namespace has no annotation {PREFETCH_FROM_ANNOTATION} naming {from}"
                ),
            })
            .collect();
        Some(reasons.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_namespace_decides_and_the_switch_is_the_default() {
        let mut policy = NamespacePolicy::new(false);
        assert!(policy.allows("team-a", "team-a"));
        assert!(!policy.allows("team-a", "shared"));
        assert!(policy.set("shared", Some(" team-a , team-b ")));
        assert!(!policy.set("shared", Some(" team-a , team-b ")));
        assert!(policy.allows("team-a", "shared"));
        assert!(!policy.allows("team-c", "shared"));
        policy.set("open", Some("*"));
        assert!(policy.allows("anyone", "open"));

        // With the switch on, a namespace can still opt out.
        let mut open = NamespacePolicy::new(true);
        assert!(open.allows("team-a", "other"));
        open.set("private", Some(""));
        assert!(!open.allows("team-a", "private"));
        assert!(open.set("private", None));
        assert!(open.allows("team-a", "private"));
    }

    #[test]
    fn refusals_say_which_rule_refused() {
        let mut policy = NamespacePolicy::new(false);
        policy.replace_all([("shared", "team-b")]);
        assert_eq!(policy.refusal("team-a", &[]), None);
        assert_eq!(
            policy
                .refusal("team-a", &["other".to_string(), "shared".to_string()])
                .as_deref(),
            Some(
                "namespace other refused: cross-namespace prefetching is disabled by policy (policy.cross_namespace = false) and the namespace has no annotation cache.techsquad.rocks/prefetch-from naming team-a; namespace shared refused: its annotation cache.techsquad.rocks/prefetch-from = \"team-b\" does not name team-a"
            )
        );
    }
}
