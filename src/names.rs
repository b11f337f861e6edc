//! Kubernetes name rules (as apimachinery's validation has them), for values
//! we pass to the API server or build selectors from: checking them first
//! turns a confusing server error, or a selector that means something else,
//! into a message naming the value.

/// Longest DNS-1123 label (namespaces, label names).
pub const DNS_LABEL_MAX: usize = 63;
/// Longest DNS-1123 subdomain (most object names, label key prefixes).
pub const DNS_SUBDOMAIN_MAX: usize = 253;
/// Longest label value, and longest label name (the part after the prefix).
pub const LABEL_MAX: usize = 63;

fn is_lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// RFC 1123 label: at most 63 lowercase letters, digits and '-', starting
/// and ending with a letter or digit (namespaces, for one).
pub fn dns_label(value: &str) -> Result<(), String> {
    const RULE: &str = "a DNS-1123 label: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit";
    let ok = !value.is_empty()
        && value.len() <= DNS_LABEL_MAX
        && value.starts_with(is_lower_alnum)
        && value.ends_with(is_lower_alnum)
        && value.chars().all(|c| is_lower_alnum(c) || c == '-');
    if ok { Ok(()) } else { Err(RULE.to_string()) }
}

/// RFC 1123 subdomain: at most 253 characters, DNS-1123 labels-like parts
/// (lowercase letters, digits, '-') joined by '.' (Lease and PriorityClass
/// names, label key prefixes).
pub fn dns_subdomain(value: &str) -> Result<(), String> {
    const RULE: &str = "a DNS-1123 subdomain: at most 253 lowercase letters, digits, '-' and '.', starting and ending with a letter or digit";
    let ok = !value.is_empty()
        && value.len() <= DNS_SUBDOMAIN_MAX
        && value.split('.').all(|part| {
            !part.is_empty()
                && part.starts_with(is_lower_alnum)
                && part.ends_with(is_lower_alnum)
                && part.chars().all(|c| is_lower_alnum(c) || c == '-')
        });
    if ok { Ok(()) } else { Err(RULE.to_string()) }
}

fn is_label_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= LABEL_MAX
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A label key: an optional DNS-1123 subdomain prefix and '/', then a name
/// of at most 63 letters, digits, '-', '_' and '.', starting and ending with
/// a letter or digit.
pub fn label_key(key: &str) -> Result<(), String> {
    const RULE: &str = "a label key: an optional DNS subdomain prefix and '/', then at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit";
    let ok = match key.split_once('/') {
        Some((prefix, name)) => dns_subdomain(prefix).is_ok() && is_label_name(name),
        None => is_label_name(key),
    };
    if ok { Ok(()) } else { Err(RULE.to_string()) }
}

/// A label value: empty, or at most 63 letters, digits, '-', '_' and '.',
/// starting and ending with a letter or digit.
pub fn label_value(value: &str) -> Result<(), String> {
    const RULE: &str = "a label value: empty, or at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit";
    if value.is_empty() || is_label_name(value) {
        Ok(())
    } else {
        Err(RULE.to_string())
    }
}

/// Messages quote at most this many characters of a value: they end up in
/// statuses, which must stay small whatever a spec holds.
pub const QUOTED_MAX: usize = 100;

/// `text` quoted, cut to [`QUOTED_MAX`] characters with its length noted.
pub fn quoted(text: &str) -> String {
    let length = text.chars().count();
    if length <= QUOTED_MAX {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(QUOTED_MAX).collect();
        format!("{head:?}... ({length} characters)")
    }
}

/// A label pair that cannot be part of a selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} {} is not {rule}", if *is_key { "key" } else { "value" }, quoted(what))]
pub struct InvalidLabel {
    /// The offending key, or value.
    pub what: String,
    pub is_key: bool,
    pub rule: String,
}

/// An equality-based label selector (`a=b,c=d`) matching all `pairs`.
///
/// Every key and value is checked first: a key like `app!` would otherwise
/// make `app!=web`, a selector meaning "app is not web".
pub fn equality_selector<'a>(
    pairs: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<String, InvalidLabel> {
    let mut parts = Vec::new();
    for (key, value) in pairs {
        label_key(key).map_err(|rule| InvalidLabel {
            what: key.clone(),
            is_key: true,
            rule,
        })?;
        label_value(value).map_err(|rule| InvalidLabel {
            what: value.clone(),
            is_key: false,
            rule,
        })?;
        parts.push(format!("{key}={value}"));
    }
    Ok(parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn dns_labels() {
        for good in ["a", "kube-prefetch", "0", "a-1", &"a".repeat(63)] {
            assert_eq!(dns_label(good), Ok(()), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "a\nb", &"a".repeat(64)] {
            assert!(dns_label(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dns_subdomains() {
        for good in ["a", "a.b", "kube-prefetch.example.com", &"a".repeat(253)] {
            assert_eq!(dns_subdomain(good), Ok(()), "{good}");
        }
        for bad in ["", ".a", "a.", "a..b", "A.b", "a_b", &"a".repeat(254)] {
            assert!(dns_subdomain(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn label_keys_and_values() {
        for good in ["app", "App_1.x", "example.com/app", "a/b", &"k".repeat(63)] {
            assert_eq!(label_key(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "app!",
            "a=b",
            "a,b",
            "/app",
            "example.com/",
            "Example.com/app",
            "a/b/c",
            "-app",
            " app",
            &"k".repeat(64),
        ] {
            assert!(label_key(bad).is_err(), "{bad:?}");
        }
        for good in ["", "web", "v1.2_3-x"] {
            assert_eq!(label_value(good), Ok(()), "{good}");
        }
        for bad in ["-web", "a b", "x=y", "a,b", &"v".repeat(64)] {
            assert!(label_value(bad).is_err(), "{bad:?}");
        }
    }

    /// Kubernetes' selector lexer (apimachinery labels.Lexer): identifiers
    /// are runs of anything but whitespace and the operator characters.
    fn parse_selector(selector: &str) -> Vec<(String, String, String)> {
        const SPECIAL: &[char] = &['!', '=', ',', '(', ')', '<', '>'];
        let mut tokens: Vec<String> = Vec::new();
        let mut chars = selector.chars().peekable();
        while let Some(&c) = chars.peek() {
            if c == ' ' || c == '\t' {
                chars.next();
            } else if SPECIAL.contains(&c) {
                chars.next();
                let mut token = c.to_string();
                if matches!(c, '!' | '=') && chars.peek() == Some(&'=') {
                    chars.next();
                    token.push('=');
                }
                tokens.push(token);
            } else {
                let mut identifier = String::new();
                while let Some(&c) = chars.peek() {
                    if c == ' ' || c == '\t' || SPECIAL.contains(&c) {
                        break;
                    }
                    identifier.push(c);
                    chars.next();
                }
                tokens.push(identifier);
            }
        }
        tokens
            .split(|token| token == ",")
            .filter(|requirement| !requirement.is_empty())
            .map(|requirement| match requirement {
                [key, op, value] => (key.clone(), op.clone(), value.clone()),
                [key, op] => (key.clone(), op.clone(), String::new()),
                other => (other.join(" "), String::new(), String::new()),
            })
            .collect()
    }

    #[test]
    fn long_labels_are_quoted_short() {
        let key = "k!".repeat(3000);
        let pairs = BTreeMap::from([(key, "v".to_string())]);
        let error = equality_selector(&pairs).expect_err("bad key").to_string();
        assert_eq!(
            error,
            format!(
                "key {:?}... (6000 characters) is not {}",
                "k!".repeat(50),
                label_key("!").expect_err("bad key")
            )
        );
    }

    #[test]
    fn the_test_lexer_reads_a_bad_key_as_kubernetes_does() {
        assert_eq!(
            parse_selector("app!=web"),
            vec![("app".into(), "!=".into(), "web".into())]
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn valid_key() -> impl Strategy<Value = String> {
            "([a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\\.[a-z0-9]{1,5}){0,2}/)?[A-Za-z0-9]([A-Za-z0-9_.-]{0,20}[A-Za-z0-9])?"
        }

        fn valid_value() -> impl Strategy<Value = String> {
            "([A-Za-z0-9]([A-Za-z0-9_.-]{0,20}[A-Za-z0-9])?)?"
        }

        /// Keys and values, valid or not (printable ASCII, as people type).
        fn any_label() -> impl Strategy<Value = String> {
            prop_oneof![valid_key(), valid_value(), "[ -~]{0,12}", any::<String>()]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Never panics; accepts exactly the maps of valid keys and
            /// values; what it builds parses back to the same pairs.
            #[test]
            fn selector_round_trips(
                pairs in prop::collection::btree_map(any_label(), any_label(), 0..6)
            ) {
                let valid = pairs
                    .iter()
                    .all(|(key, value)| label_key(key).is_ok() && label_value(value).is_ok());
                match equality_selector(&pairs) {
                    Ok(selector) => {
                        prop_assert!(valid, "accepted invalid pairs {:?}", pairs);
                        let parsed = parse_selector(&selector);
                        let expected: Vec<(String, String, String)> = pairs
                            .iter()
                            .map(|(key, value)| (key.clone(), "=".to_string(), value.clone()))
                            .collect();
                        prop_assert_eq!(parsed, expected);
                    }
                    Err(_) => prop_assert!(!valid, "refused valid pairs {:?}", pairs),
                }
            }

            #[test]
            fn valid_pairs_always_build(
                pairs in prop::collection::btree_map(valid_key(), valid_value(), 1..6)
            ) {
                let pairs: BTreeMap<String, String> = pairs;
                let selector = equality_selector(&pairs);
                prop_assert!(selector.is_ok(), "{:?}: {:?}", pairs, selector);
            }
        }
    }
}
