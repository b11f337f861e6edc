//! TOML configuration: strict parsing, env overrides, semantic checks.
