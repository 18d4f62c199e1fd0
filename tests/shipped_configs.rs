//! The configs shipped in deploy/config/ load, and document every key the
//! role knows (as a setting, or as a commented-out example for optional keys).

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;

use rim_config::{CometRoleConfig, JobRoleConfig, Load, LogicRoleConfig, StandaloneConfig};
use serde::Serialize;
use support::key_paths;

fn path(role: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/config")
        .join(format!("{role}.toml"))
}

/// Dotted paths of keys shown commented out (`# key = ...`) under a
/// `[section]`, and of commented array-of-tables examples (`# [[a.b]]`).
fn commented_keys(text: &str) -> BTreeSet<String> {
    let mut section = String::new();
    let mut out = BTreeSet::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some(name) = line.strip_prefix("# [[").and_then(|l| l.strip_suffix("]]")) {
            // A commented array-of-tables example documents the array key.
            out.insert(name.to_owned());
            section = name.to_owned();
        } else if let Some(rest) = line.strip_prefix("# ")
            && let Some((key, _)) = rest.split_once(" = ")
            && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            out.insert(format!("{section}.{key}"));
        }
    }
    out
}

/// The tokens the shipped cluster configs expect from the environment.
const TOKENS: [(&str, &str); 3] = [
    ("RIM_NODE__GRPC_TOKEN", "grpc-secret"),
    ("RIM_API__ADMIN_TOKEN", "admin-secret"),
    ("RIM_API__PUSH_TOKEN", "push-secret"),
];

fn check<C: Load + Serialize + std::fmt::Debug>(role: &str) {
    let file = path(role);
    // The distributed logic config refuses to start without a JWT secret,
    // and the cluster configs without their tokens (they bind 0.0.0.0).
    let mut env = vec![("RIM_LOGIC__AUTH__JWT_SECRET".to_string(), "x".repeat(32))];
    env.extend(TOKENS.map(|(k, v)| (k.to_string(), v.to_string())));
    let config = C::load_from(Some(&file), env)
        .unwrap_or_else(|e| panic!("{} does not load: {e}", file.display()));
    let text = std::fs::read_to_string(&file).unwrap();
    let mut documented = BTreeSet::new();
    key_paths(&text.parse::<toml::Table>().unwrap(), "", &mut documented);
    documented.extend(commented_keys(&text));

    let mut known = BTreeSet::new();
    let defaults = toml::Table::try_from(C::default()).unwrap();
    key_paths(&defaults, "", &mut known);
    // Optional keys (unset by default) must be shown as commented examples.
    let loaded = toml::Table::try_from(&config).unwrap();
    key_paths(&loaded, "", &mut known);
    let missing: Vec<_> = known.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "{role}.toml does not document {missing:?}"
    );
}

#[test]
fn standalone_config_loads_and_documents_every_key() {
    check::<StandaloneConfig>("standalone");
}

#[test]
fn comet_config_loads_and_documents_every_key() {
    check::<CometRoleConfig>("comet");
}

#[test]
fn logic_config_loads_and_documents_every_key() {
    check::<LogicRoleConfig>("logic");
}

#[test]
fn job_config_loads_and_documents_every_key() {
    check::<JobRoleConfig>("job");
}

#[test]
fn the_distributed_logic_config_requires_a_jwt_secret() {
    let err = LogicRoleConfig::load_from(Some(&path("logic")), Vec::new()).unwrap_err();
    assert!(err.to_string().contains("logic.auth.jwt_secret"), "{err}");
}

#[test]
fn optional_keys_are_documented_too() {
    let text = std::fs::read_to_string(path("comet")).unwrap();
    let commented = commented_keys(&text);
    assert!(commented.contains("comet.tls_cert"), "{commented:?}");
    assert!(commented.contains("comet.tls_key"), "{commented:?}");
    // The cluster configs show the internal gRPC's TLS (commented: they run
    // plaintext as shipped), and logic the HTTPS API.
    for role in ["comet", "logic", "job"] {
        let commented = commented_keys(&std::fs::read_to_string(path(role)).unwrap());
        for key in ["node.tls_cert", "node.tls_key", "node.tls_ca"] {
            assert!(
                commented.contains(key),
                "{role}.toml: {key} in {commented:?}"
            );
        }
    }
    let commented = commented_keys(&std::fs::read_to_string(path("logic")).unwrap());
    for key in ["api.tls_cert", "api.tls_key"] {
        assert!(
            commented.contains(key),
            "logic.toml: {key} in {commented:?}"
        );
    }
}

#[test]
fn the_cluster_configs_require_their_tokens_and_standalone_binds_loopback() {
    let jwt = ("RIM_LOGIC__AUTH__JWT_SECRET".to_string(), "x".repeat(32));
    let err = LogicRoleConfig::load_from(Some(&path("logic")), vec![jwt.clone()]).unwrap_err();
    assert!(
        err.to_string().starts_with("api.admin_token: required"),
        "{err}"
    );
    let err = CometRoleConfig::load_from(Some(&path("comet")), Vec::new()).unwrap_err();
    assert!(
        err.to_string().starts_with("node.grpc_token: required"),
        "{err}"
    );
    // The job serves nothing that can push: it loads without tokens.
    JobRoleConfig::load_from(Some(&path("job")), Vec::new()).unwrap();
    let standalone = StandaloneConfig::load_from(Some(&path("standalone")), Vec::new()).unwrap();
    assert!(standalone.api.http_bind.ip().is_loopback());
    assert!(standalone.comet.grpc_bind.ip().is_loopback());
}
