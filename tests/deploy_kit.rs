//! The deploy kit in deploy/ checked against the code: no container runtime
//! runs here, so compose, Kubernetes and systemd files are validated
//! statically — every YAML document parses, every file they reference
//! exists, every `RIM_*` override is a real key (the `rim` binary loads it
//! with `--check` and prints the value back), every port is a port the role
//! binds, and every probe asks for an endpoint rim serves. The local-cluster
//! script is run for real by the ignored test at the end.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;
use serde_yaml_ng::Value as Yaml;

/// The grace period `rim` gives its tasks after a role returned (src/main.rs).
const GRACE_SECS: u64 = 5;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every document of a YAML file, with `<<` merge keys applied.
fn yaml_docs(path: &Path) -> Vec<Yaml> {
    let text = read(path);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            let mut value = Yaml::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
            value
                .apply_merge()
                .unwrap_or_else(|e| panic!("{}: bad merge key: {e}", path.display()));
            value
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

fn s(value: &Yaml) -> String {
    match value {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn seq(value: &Yaml) -> &[Yaml] {
    value.as_sequence().map_or(&[], |v| v.as_slice())
}

// ------------------------------------------------------------ the roles

/// What `rim <role> --config <file> --check` printed with an environment.
struct Effective {
    config: toml::Table,
}

/// Runs `rim <role> --config <config> --check` with exactly `env` as the
/// `RIM_*` environment, expects exit 0, and checks that every override is
/// visible in the printed configuration.
fn check(role: &str, config: &Path, env: &[(String, String)], origin: &str) -> Effective {
    assert!(
        config.is_file(),
        "{origin}: config {} does not exist",
        config.display()
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rim"));
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("RIM_")) {
        cmd.env_remove(name);
    }
    let out = cmd
        .args([role, "--config"])
        .arg(config)
        .arg("--check")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .output()
        .expect("run rim --check");
    assert!(
        out.status.success(),
        "{origin}: rim {role} --config {} --check with {env:?} failed ({}): {}",
        config.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let table: toml::Table = String::from_utf8_lossy(&out.stdout)
        .parse()
        .unwrap_or_else(|e| panic!("{origin}: --check printed no TOML: {e}"));
    let effective = Effective { config: table };
    for (name, value) in env {
        let Some(path) = config_key(name) else {
            continue;
        };
        let printed = effective.get(&path).unwrap_or_else(|| {
            panic!(
                "{origin}: {name} is not a config key of rim {role} (no {} in its config)",
                path.join(".")
            )
        });
        assert_eq!(
            flat(printed),
            normalize(value),
            "{origin}: {name}={value:?} is not what rim {role} loaded"
        );
    }
    effective
}

/// `RIM_LOGIC__AUTH__JWT_SECRET` → `["logic", "auth", "jwt_secret"]`; `None`
/// for variables that are not configuration (no `__`).
fn config_key(name: &str) -> Option<Vec<String>> {
    let rest = name.strip_prefix("RIM_")?;
    rest.contains("__")
        .then(|| rest.split("__").map(str::to_ascii_lowercase).collect())
}

/// A printed value as the environment would spell it (lists comma-separated).
fn flat(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(items) => items.iter().map(flat).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn normalize(value: &str) -> String {
    if value.contains(',') {
        value
            .split(',')
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(",")
    } else {
        value.trim().to_owned()
    }
}

impl Effective {
    fn get(&self, path: &[String]) -> Option<&toml::Value> {
        let (last, sections) = path.split_last()?;
        let mut table = &self.config;
        for section in sections {
            table = table.get(section)?.as_table()?;
        }
        table.get(last)
    }

    fn str_at(&self, key: &str) -> Option<String> {
        let path: Vec<String> = key.split('.').map(str::to_owned).collect();
        self.get(&path).map(flat)
    }

    fn port_of(addr: &str) -> u16 {
        addr.rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{addr:?} has no port"))
    }

    /// Every port this role binds, with the key that binds it.
    fn bind_ports(&self) -> BTreeMap<u16, String> {
        let mut keys = vec![
            "comet.tcp_bind",
            "comet.ws_bind",
            "comet.grpc_bind",
            "logic.grpc_bind",
            "api.http_bind",
            "metrics.bind",
        ];
        if self.str_at("comet.tls_cert").is_some() {
            keys.push("comet.wss_bind");
        }
        let mut ports = BTreeMap::new();
        for key in keys {
            let Some(list) = self.str_at(key) else {
                continue;
            };
            for addr in list.split(',').filter(|a| !a.trim().is_empty()) {
                ports.insert(Effective::port_of(addr), key.to_owned());
            }
        }
        ports
    }

    /// The HTTP endpoints this role serves, as (port, path). The live test
    /// (`local_cluster_...`) GETs every one of them on running processes.
    fn http_endpoints(&self) -> BTreeSet<(u16, String)> {
        let mut out = BTreeSet::new();
        if let Some(addr) = self.str_at("api.http_bind") {
            let port = Effective::port_of(&addr);
            for path in API_ENDPOINTS {
                out.insert((port, (*path).to_owned()));
            }
        }
        if let Some(addr) = self.str_at("metrics.bind").filter(|a| !a.is_empty()) {
            out.insert((Effective::port_of(&addr), "/metrics".to_owned()));
        }
        out
    }

    fn drain_secs(&self) -> u64 {
        let text = self
            .str_at("comet.drain_window")
            .expect("comet.drain_window");
        parse_secs(&text)
    }

    fn has_metrics_section(&self) -> bool {
        self.config.contains_key("metrics")
    }
}

/// Paths the logic/standalone HTTP listener (api.http_bind) serves for
/// probes and scrapes.
const API_ENDPOINTS: &[&str] = &["/healthz", "/readyz", "/metrics"];

/// "10s", "1m", "500ms", "60" → whole seconds (rounded up).
fn parse_secs(text: &str) -> u64 {
    let text = text.trim();
    let digits: String = text.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits
        .parse()
        .unwrap_or_else(|_| panic!("{text:?} is not a duration"));
    match &text[digits.len()..] {
        "" | "s" => n,
        "ms" => n.div_ceil(1000),
        "m" | "min" => n * 60,
        "h" => n * 3600,
        unit => panic!("unknown unit {unit:?} in {text:?}"),
    }
}

/// The roles, as `rim <role>` subcommands.
const ROLES: &[&str] = &["comet", "logic", "job", "standalone"];

fn shipped(role: &str) -> PathBuf {
    root().join("deploy/config").join(format!("{role}.toml"))
}

/// Whether this `rim` knows the `[metrics]` section (comet, job).
fn binary_has_metrics() -> bool {
    check(
        "comet",
        &shipped("comet"),
        &shipped_secrets("comet"),
        "rim comet",
    )
    .has_metrics_section()
}

// ------------------------------------------------------------ env names

/// Every `RIM_<SECTION>__<KEY>` name in a text.
fn env_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("RIM_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(text.len() - start);
        let name = &text[start..end];
        if boundary && name.contains("__") && !name.ends_with('_') {
            out.insert(name.to_owned());
        }
        i = end.max(start + 1);
    }
    out
}

/// Every file of the deploy kit that names `RIM_*` variables.
fn kit_files() -> Vec<PathBuf> {
    let mut files = vec![
        root().join("deploy/local-cluster.sh"),
        root().join("deploy/docker-compose.yml"),
        root().join("deploy/docker/Dockerfile"),
        root().join("docs/operations.md"),
        root().join("README.md"),
    ];
    for dir in ["deploy/k8s", "deploy/systemd"] {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        files.extend(entries);
    }
    files
}

#[test]
fn every_rim_variable_named_in_the_kit_is_a_config_key() {
    let defaults: Vec<Effective> = ROLES.iter().map(|role| every_key(role)).collect();
    let metrics = binary_has_metrics();
    let mut checked = 0;
    for file in kit_files() {
        for name in env_names(&read(&file)) {
            let path = config_key(&name).unwrap();
            if path[0] == "metrics" && !metrics {
                panic!(
                    "{} names {name}, but this rim has no [metrics] section",
                    file.display()
                );
            }
            // queue.kafka is a table of librdkafka properties: any name under it.
            let free_form = path.len() > 2 && path[..2] == ["queue", "kafka"];
            assert!(
                defaults
                    .iter()
                    .any(|e| e.get(&path).is_some() || (free_form && e.get(&path[..2]).is_some())),
                "{}: {name} is not a config key of any role ({} does not exist)",
                file.display(),
                path.join(".")
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} RIM_* names found in the kit");
}

/// A role's shipped config with every optional key set too (the tokens;
/// TLS files, which `--check` only requires to exist), so that every key is
/// printed.
fn every_key(role: &str) -> Effective {
    let mut env = shipped_secrets(role);
    if role == "standalone" {
        env.push(("RIM_API__ADMIN_TOKEN".into(), "token".into()));
        env.push(("RIM_API__PUSH_TOKEN".into(), "token".into()));
    }
    if matches!(role, "logic" | "standalone") {
        // [im]'s optional keys.
        env.push(("RIM_IM__NODE".into(), "1".into()));
        env.push(("RIM_IM__API_TOKEN".into(), "token".into()));
    }
    let existing = shipped(role).display().to_string();
    if matches!(role, "comet" | "standalone") {
        env.push(("RIM_COMET__TLS_CERT".into(), existing.clone()));
        env.push(("RIM_COMET__TLS_KEY".into(), existing.clone()));
    }
    if matches!(role, "logic" | "standalone") {
        env.push(("RIM_API__TLS_CERT".into(), existing.clone()));
        env.push(("RIM_API__TLS_KEY".into(), existing.clone()));
    }
    // The gRPC TLS files (every role has [node]).
    env.push(("RIM_NODE__TLS_CERT".into(), existing.clone()));
    env.push(("RIM_NODE__TLS_KEY".into(), existing.clone()));
    env.push(("RIM_NODE__TLS_CA".into(), existing));
    check(role, &shipped(role), &env, "every key")
}

/// The secrets a role's shipped config needs from the environment: the
/// logic's JWT secret, and the tokens of the listeners the cluster configs
/// bind to 0.0.0.0.
fn shipped_secrets(role: &str) -> Vec<(String, String)> {
    let mut env = vec![("RIM_NODE__GRPC_TOKEN".into(), "token".into())];
    if role == "logic" {
        env.push(("RIM_LOGIC__AUTH__JWT_SECRET".into(), "x".repeat(32)));
        env.push(("RIM_API__ADMIN_TOKEN".into(), "token".into()));
        env.push(("RIM_API__PUSH_TOKEN".into(), "token".into()));
    }
    env
}

#[test]
fn env_names_are_found_in_text() {
    let names = env_names(
        "a RIM_NODE__ID=1 $RIM_BIN ${RIM_LOGIC__AUTH__JWT_SECRET:?x} XRIM_A__B RIM_TEST_REDIS",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["RIM_LOGIC__AUTH__JWT_SECRET", "RIM_NODE__ID"]
    );
}

// ------------------------------------------------------------ compose

/// `${VAR:?message}` / `${VAR:-default}` as compose would interpolate them
/// with a secret of 40 bytes for the required ones.
fn interpolate(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let end = rest[at..].find('}').expect("unclosed ${") + at;
        let inner = &rest[at + 2..end];
        if let Some((_, default)) = inner.split_once(":-") {
            out.push_str(default);
        } else {
            assert!(
                inner.contains(":?"),
                "${{{inner}}} has no default and is not required"
            );
            out.push_str(&"s".repeat(40));
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

#[test]
fn compose_services_load_their_configs_and_publish_their_bind_ports() {
    let deploy = root().join("deploy");
    let docs = yaml_docs(&deploy.join("docker-compose.yml"));
    assert_eq!(docs.len(), 1);
    let services = docs[0]["services"].as_mapping().expect("services");
    let names: BTreeSet<String> = services.keys().map(s).collect();
    for needed in ["kafka", "zookeeper", "redis", "logic", "job"] {
        assert!(names.contains(needed), "compose has no {needed} service");
    }
    let mut roles: BTreeMap<String, usize> = BTreeMap::new();
    for (name, service) in services {
        let name = s(name);
        let origin = format!("docker-compose.yml service {name}");
        if let Some(build) = service.get("build") {
            let context = deploy.join(s(&build["context"]));
            let dockerfile = context.join(s(&build["dockerfile"]));
            assert!(
                dockerfile.is_file(),
                "{origin}: no {}",
                dockerfile.display()
            );
        }
        if service.get("image").map(s).as_deref() != Some("rim:latest") {
            continue;
        }
        let command: Vec<String> = seq(&service["command"]).iter().map(s).collect();
        let [role, flag, config] = command.as_slice() else {
            panic!("{origin}: command should be [role, --config, path], got {command:?}");
        };
        assert_eq!(flag, "--config", "{origin}");
        *roles.entry(role.clone()).or_default() += 1;
        // Wildcard binds register the host name, which the others must
        // resolve: Docker's DNS knows service names, not `hostname`s.
        assert_eq!(
            service.get("hostname").map(s).as_deref(),
            Some(name.as_str()),
            "{origin}: hostname must be the service name"
        );
        // The config path inside the container is a mounted shipped file.
        let host = seq(&service["volumes"])
            .iter()
            .map(s)
            .find_map(|v| {
                let mut parts = v.split(':');
                let (host, container) = (parts.next()?, parts.next()?);
                (container == config).then(|| deploy.join(host))
            })
            .unwrap_or_else(|| panic!("{origin}: nothing is mounted at {config}"));
        let env: Vec<(String, String)> = service["environment"]
            .as_mapping()
            .expect("environment")
            .iter()
            .map(|(k, v)| (s(k), interpolate(&s(v))))
            .collect();
        let effective = check(role, &host, &env, &origin);
        let binds = effective.bind_ports();
        let mut declared = BTreeSet::new();
        for port in seq(&service["ports"]).iter().map(s) {
            let (published, target) = port.split_once(':').expect("ports are host:container");
            assert_eq!(
                published, target,
                "{origin}: comets advertise the ports they bind, so publish {port} 1:1"
            );
            declared.insert(target.parse::<u16>().unwrap());
        }
        for port in seq(&service["expose"]).iter().map(s) {
            declared.insert(port.parse().unwrap());
        }
        for port in &declared {
            assert!(
                binds.contains_key(port),
                "{origin}: port {port} is not bound by rim {role} (binds {binds:?})"
            );
        }
        for (port, key) in &binds {
            assert!(
                declared.contains(port),
                "{origin}: {key} binds {port}, which is neither published nor exposed"
            );
        }
        let test = seq(&service["healthcheck"]["test"])
            .iter()
            .map(s)
            .collect::<Vec<_>>()
            .join(" ");
        let (port, path) = http_url_in(&test)
            .unwrap_or_else(|| panic!("{origin}: healthcheck {test:?} has no http URL"));
        assert!(
            effective.http_endpoints().contains(&(port, path.clone())),
            "{origin}: healthcheck asks for :{port}{path}, which rim {role} does not serve"
        );
        if role == "comet" {
            let grace = parse_secs(&s(&service["stop_grace_period"]));
            assert!(
                grace > effective.drain_secs() + GRACE_SECS,
                "{origin}: stop_grace_period {grace}s does not cover the drain window"
            );
        }
        // Service addresses point at services of this file.
        for key in ["queue.brokers", "discovery.zookeeper", "router.redis"] {
            if let Some(list) = effective.str_at(key)
                && env
                    .iter()
                    .any(|(n, _)| config_key(n).is_some_and(|p| p.join(".") == key))
            {
                for addr in list.split(',') {
                    let host = addr
                        .trim_start_matches("redis://")
                        .split(':')
                        .next()
                        .unwrap();
                    assert!(
                        names.contains(host),
                        "{origin}: {key} names {host}, not a service"
                    );
                }
            }
        }
    }
    assert_eq!(roles.get("comet"), Some(&2), "two comets: {roles:?}");
    assert_eq!(roles.get("logic"), Some(&1), "{roles:?}");
    assert_eq!(roles.get("job"), Some(&1), "{roles:?}");
}

/// The port and path of the first `http://host:port/path` in a text.
fn http_url_in(text: &str) -> Option<(u16, String)> {
    let at = text.find("http://")? + "http://".len();
    let rest = &text[at..];
    let end = rest.find([' ', '"', '\'']).unwrap_or(rest.len());
    let (hostport, path) = rest[..end].split_once('/')?;
    let port = hostport.rsplit(':').next()?.parse().ok()?;
    Some((port, format!("/{path}")))
}

#[test]
fn the_dockerfile_builds_rim_and_runs_it_unprivileged() {
    let text = read(&root().join("deploy/docker/Dockerfile"));
    assert!(text.contains("cargo build --release --locked --bin rim"));
    let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "multi-stage build expected");
    let user = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "runs as {user}"
    );
    // Every COPY source exists in the build context (the repository root).
    for line in text
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(root().join(src).exists(), "Dockerfile copies missing {src}");
        }
    }
    let exposed: BTreeSet<u16> = text
        .lines()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|l| l.split_whitespace().map(|p| p.parse().unwrap()))
        .collect();
    let mut bound = BTreeSet::new();
    for role in ["comet", "logic", "job"] {
        let effective = check(role, &shipped(role), &shipped_secrets(role), "Dockerfile");
        bound.extend(effective.bind_ports().into_keys());
        // WSS is bound when certificates are configured.
        if let Some(wss) = effective.str_at("comet.wss_bind") {
            bound.extend(wss.split(',').map(Effective::port_of));
        }
    }
    assert_eq!(exposed, bound, "EXPOSE lists exactly the default ports");
}

// ------------------------------------------------------------ Kubernetes

struct K8s {
    docs: Vec<(String, Yaml)>,
    generated_configs: BTreeSet<String>,
    config_map: String,
}

fn load_k8s() -> K8s {
    let dir = root().join("deploy/k8s");
    let kustomization = yaml_docs(&dir.join("kustomization.yaml"));
    let kz = &kustomization[0];
    let mut docs = Vec::new();
    for resource in seq(&kz["resources"]).iter().map(s) {
        let path = dir.join(&resource);
        assert!(
            path.is_file(),
            "kustomization resource {resource} does not exist"
        );
        docs.extend(yaml_docs(&path).into_iter().map(|d| (resource.clone(), d)));
    }
    // Every YAML file in the folder is used.
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            assert!(
                seq(&kz["resources"]).iter().any(|r| s(r) == name),
                "deploy/k8s/{name} is not in kustomization.yaml"
            );
        }
    }
    let generators = seq(&kz["configMapGenerator"]);
    assert_eq!(generators.len(), 1, "one ConfigMap of configs");
    let mut generated_configs = BTreeSet::new();
    for file in seq(&generators[0]["files"]).iter().map(s) {
        let path = dir.join(&file);
        assert!(
            path.is_file(),
            "configMapGenerator file {file} does not exist"
        );
        let config_dir = root().join("deploy/config").canonicalize().unwrap();
        assert!(
            path.canonicalize().unwrap().parent() == Some(config_dir.as_path()),
            "{file} is not a shipped config"
        );
        generated_configs.insert(
            Path::new(&file)
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    K8s {
        docs,
        generated_configs,
        config_map: s(&generators[0]["name"]),
    }
}

impl K8s {
    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Yaml> + 'a {
        self.docs
            .iter()
            .map(|(_, d)| d)
            .filter(move |d| d["kind"].as_str() == Some(kind))
    }

    fn workloads(&self) -> impl Iterator<Item = &Yaml> {
        self.docs.iter().map(|(_, d)| d).filter(|d| {
            matches!(
                d["kind"].as_str(),
                Some("Deployment" | "StatefulSet" | "DaemonSet")
            )
        })
    }

    fn secret_value(&self, name: &str, key: &str) -> String {
        let secret = self
            .of_kind("Secret")
            .find(|d| d["metadata"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no Secret {name}"));
        s(&secret["stringData"][key])
    }

    fn service_names(&self) -> BTreeSet<String> {
        self.of_kind("Service")
            .map(|d| s(&d["metadata"]["name"]))
            .collect()
    }
}

/// A container's environment as the kubelet would give it: field refs and
/// secrets filled in, `$(VAR)` expanded from earlier entries.
fn container_env(k8s: &K8s, container: &Yaml) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for entry in seq(&container["env"]) {
        let name = s(&entry["name"]);
        let value = if let Some(value) = entry.get("value") {
            let mut value = s(value);
            for (known, v) in &env {
                value = value.replace(&format!("$({known})"), v);
            }
            assert!(
                !value.contains("$("),
                "{name}: unresolved reference in {value:?}"
            );
            value
        } else if let Some(field) = entry["valueFrom"].get("fieldRef") {
            match s(&field["fieldPath"]).as_str() {
                "status.podIP" => "127.0.0.1".into(),
                "metadata.name" => "rim-pod-0".into(),
                "spec.nodeName" => "node-1".into(),
                other => panic!("{name}: unexpected fieldRef {other}"),
            }
        } else if let Some(secret) = entry["valueFrom"].get("secretKeyRef") {
            k8s.secret_value(&s(&secret["name"]), &s(&secret["key"]))
        } else {
            panic!("{name}: no value");
        };
        env.push((name, value));
    }
    env
}

fn labels_match(selector: &Yaml, labels: &Yaml) -> bool {
    selector
        .as_mapping()
        .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

#[test]
fn kubernetes_workloads_load_their_configs_and_probe_what_rim_serves() {
    let k8s = load_k8s();
    let services = k8s.service_names();
    let mut roles = BTreeSet::new();
    for workload in k8s.workloads() {
        let name = s(&workload["metadata"]["name"]);
        let spec = &workload["spec"]["template"]["spec"];
        let labels = &workload["spec"]["template"]["metadata"]["labels"];
        assert!(
            labels_match(&workload["spec"]["selector"]["matchLabels"], labels),
            "{name}: selector does not match its pod labels"
        );
        for container in seq(&spec["containers"]) {
            if !s(&container["image"]).starts_with("rim:") {
                continue;
            }
            let origin = format!("k8s {name}");
            let args: Vec<String> = seq(&container["args"]).iter().map(s).collect();
            let [role, flag, config] = args.as_slice() else {
                panic!("{origin}: args should be [role, --config, path], got {args:?}");
            };
            assert_eq!(flag, "--config");
            roles.insert(role.clone());
            // The config path is a key of the generated ConfigMap, mounted.
            let mount = seq(&container["volumeMounts"])
                .iter()
                .find(|m| s(&m["mountPath"]) == *config)
                .unwrap_or_else(|| panic!("{origin}: nothing mounted at {config}"));
            let file = s(&mount["subPath"]);
            assert!(
                k8s.generated_configs.contains(&file),
                "{origin}: {file} is not generated"
            );
            let volume = seq(&spec["volumes"])
                .iter()
                .find(|v| v["name"] == mount["name"])
                .unwrap_or_else(|| panic!("{origin}: no volume {:?}", mount["name"]));
            assert_eq!(s(&volume["configMap"]["name"]), k8s.config_map, "{origin}");

            let env = container_env(&k8s, container);
            let effective = check(role, &shipped(role), &env, &origin);
            let binds = effective.bind_ports();
            let mut named = BTreeMap::new();
            for port in seq(&container["ports"]) {
                let number: u16 = s(&port["containerPort"]).parse().unwrap();
                assert!(
                    binds.contains_key(&number),
                    "{origin}: containerPort {number} is not bound by rim {role} ({binds:?})"
                );
                named.insert(s(&port["name"]), number);
            }
            for (port, key) in &binds {
                assert!(
                    named.values().any(|p| p == port),
                    "{origin}: {key} binds {port}, which is no containerPort"
                );
            }
            let resolve = |port: &Yaml| -> u16 {
                match port {
                    Yaml::Number(n) => n.as_u64().unwrap() as u16,
                    other => *named
                        .get(&s(other))
                        .unwrap_or_else(|| panic!("{origin}: no port named {other:?}")),
                }
            };
            for probe in ["readinessProbe", "livenessProbe"] {
                let probe_spec = container
                    .get(probe)
                    .unwrap_or_else(|| panic!("{origin}: no {probe}"));
                if let Some(http) = probe_spec.get("httpGet") {
                    let endpoint = (resolve(&http["port"]), s(&http["path"]));
                    assert!(
                        effective.http_endpoints().contains(&endpoint),
                        "{origin}: {probe} asks for {endpoint:?}, which rim {role} does not serve"
                    );
                } else if let Some(tcp) = probe_spec.get("tcpSocket") {
                    let port = resolve(&tcp["port"]);
                    assert!(
                        binds.contains_key(&port),
                        "{origin}: {probe} on unbound {port}"
                    );
                } else {
                    panic!("{origin}: {probe} is neither httpGet nor tcpSocket");
                }
            }
            let annotations = &workload["spec"]["template"]["metadata"]["annotations"];
            assert_eq!(
                annotations["prometheus.io/scrape"].as_str(),
                Some("true"),
                "{origin}"
            );
            let scrape: u16 = s(&annotations["prometheus.io/port"]).parse().unwrap();
            let path = s(&annotations["prometheus.io/path"]);
            assert!(
                effective.http_endpoints().contains(&(scrape, path.clone())),
                "{origin}: Prometheus scrapes :{scrape}{path}, which rim {role} does not serve"
            );
            let requests = &container["resources"]["requests"];
            assert!(
                requests.get("cpu").is_some() && requests.get("memory").is_some(),
                "{origin}: resource requests"
            );
            let grace: u64 = s(&spec["terminationGracePeriodSeconds"]).parse().unwrap();
            let drain = if role == "comet" {
                effective.drain_secs()
            } else {
                0
            };
            assert!(
                grace > drain + GRACE_SECS,
                "{origin}: terminationGracePeriodSeconds {grace}"
            );
            for key in ["queue.brokers", "discovery.zookeeper", "router.redis"] {
                if !env
                    .iter()
                    .any(|(n, _)| config_key(n).is_some_and(|p| p.join(".") == key))
                {
                    continue;
                }
                for addr in effective.str_at(key).unwrap().split(',') {
                    let host = addr
                        .trim_start_matches("redis://")
                        .split(':')
                        .next()
                        .unwrap();
                    assert!(
                        services.contains(host),
                        "{origin}: {key} names {host}, no Service"
                    );
                }
            }
        }
    }
    assert_eq!(
        roles.into_iter().collect::<Vec<_>>(),
        ["comet", "job", "logic"],
        "one workload per distributed role"
    );

    // Services and disruption budgets select pods that exist, on ports they declare.
    let workloads: Vec<&Yaml> = k8s.workloads().collect();
    for service in k8s.of_kind("Service") {
        let name = s(&service["metadata"]["name"]);
        let target = workloads
            .iter()
            .find(|w| {
                labels_match(
                    &service["spec"]["selector"],
                    &w["spec"]["template"]["metadata"]["labels"],
                )
            })
            .unwrap_or_else(|| panic!("Service {name} selects no workload"));
        let container_ports: Vec<&Yaml> = seq(&target["spec"]["template"]["spec"]["containers"])
            .iter()
            .flat_map(|c| seq(&c["ports"]))
            .collect();
        for port in seq(&service["spec"]["ports"]) {
            let target_port = port.get("targetPort").unwrap_or(&port["port"]);
            assert!(
                container_ports
                    .iter()
                    .any(|p| p["name"] == *target_port || p["containerPort"] == *target_port),
                "Service {name}: targetPort {target_port:?} is no container port"
            );
        }
    }
    for pdb in k8s.of_kind("PodDisruptionBudget") {
        let name = s(&pdb["metadata"]["name"]);
        assert!(
            workloads.iter().any(|w| labels_match(
                &pdb["spec"]["selector"]["matchLabels"],
                &w["spec"]["template"]["metadata"]["labels"]
            )),
            "PodDisruptionBudget {name} selects no workload"
        );
    }
    for needed in ["rim-kafka", "rim-zookeeper", "rim-redis"] {
        assert!(
            k8s.of_kind("StatefulSet")
                .any(|d| s(&d["metadata"]["name"]) == needed),
            "no example StatefulSet {needed}"
        );
    }
    assert!(k8s.of_kind("Namespace").count() == 1);
}

// ------------------------------------------------------------ systemd

/// `Key=value` lines of a unit file, by key (repeated keys keep all values).
fn unit_keys(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
            continue;
        }
        let (key, value) = line.split_once('=').expect("Key=value");
        out.entry(key.to_owned())
            .or_default()
            .push(value.to_owned());
    }
    out
}

#[test]
fn systemd_units_run_a_shipped_config_hardened() {
    let dir = root().join("deploy/systemd");
    for role in ROLES {
        let unit = dir.join(format!("rim-{role}.service"));
        let keys = unit_keys(&read(&unit));
        let one = |key: &str| -> String {
            let values = keys
                .get(key)
                .unwrap_or_else(|| panic!("rim-{role}.service: no {key}"));
            assert_eq!(values.len(), 1, "rim-{role}.service: {key} set twice");
            values[0].clone()
        };
        let exec = one("ExecStart");
        let parts: Vec<&str> = exec.split_whitespace().collect();
        let config = format!("/etc/rim/{role}.toml");
        assert_eq!(
            parts,
            ["/usr/local/bin/rim", role, "--config", config.as_str()],
            "rim-{role}.service ExecStart"
        );
        assert!(shipped(role).is_file(), "{role}.toml is not shipped");
        assert_eq!(one("EnvironmentFile"), format!("-/etc/rim/{role}.env"));
        let user = one("User");
        assert!(
            !user.is_empty() && user != "root",
            "rim-{role}: User={user}"
        );
        assert_eq!(one("Restart"), "on-failure");
        assert_eq!(one("KillSignal"), "SIGTERM");
        for (key, value) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("CapabilityBoundingSet", ""),
        ] {
            assert_eq!(one(key), value, "rim-{role}.service {key}");
        }
        let nofile: u64 = one("LimitNOFILE").parse().unwrap();
        let clients = matches!(*role, "comet" | "standalone");
        assert!(
            nofile >= if clients { 1_048_576 } else { 65_536 },
            "rim-{role}: LimitNOFILE={nofile}"
        );
        let effective = check(role, &shipped(role), &shipped_secrets(role), "systemd");
        let drain = if clients { effective.drain_secs() } else { 0 };
        let stop = parse_secs(&one("TimeoutStopSec"));
        assert!(
            stop > drain + GRACE_SECS,
            "rim-{role}: TimeoutStopSec={stop}s does not cover the drain window ({drain}s) + grace"
        );

        // The example environment file is a real override set.
        let example = dir.join(format!("{role}.env.example"));
        let env: Vec<(String, String)> = read(&example)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (k, v) = l.split_once('=').expect("VAR=value");
                (k.to_owned(), v.to_owned())
            })
            .collect();
        assert!(!env.is_empty(), "{role}.env.example sets nothing");
        check(role, &shipped(role), &env, &format!("{role}.env.example"));
    }
}

// ------------------------------------------------------------ docs

#[test]
fn the_operations_doc_documents_every_config_key_and_port() {
    let doc = read(&root().join("docs/operations.md"));
    let mut keys = BTreeSet::new();
    let mut ports = BTreeSet::new();
    for role in ROLES {
        let effective = every_key(role);
        support::key_paths(&effective.config, "", &mut keys);
        ports.extend(effective.bind_ports().into_keys());
        if let Some(wss) = effective.str_at("comet.wss_bind") {
            ports.extend(wss.split(',').map(Effective::port_of));
        }
    }
    // Tables of rows, empty by default.
    keys.extend(["logic.nodes.regions", "discovery.comets"].map(String::from));
    let missing: Vec<_> = keys
        .iter()
        .filter(|k| !doc.contains(&format!("`{k}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md does not document {missing:?}"
    );
    let missing: Vec<_> = ports
        .iter()
        .filter(|p| !doc.contains(&format!("| {p} |")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md has no ports table row for {missing:?}"
    );
    let readme = read(&root().join("README.md"));
    assert!(
        readme.contains("docs/operations.md"),
        "README links the operator docs"
    );
}

// ------------------------------------------------------------ local cluster

/// Stops the cluster when the test ends, passed or not.
struct ClusterGuard {
    env: Vec<(String, String)>,
}

impl ClusterGuard {
    fn run(&self, command: &str) -> std::process::Output {
        let mut cmd = Command::new(root().join("deploy/local-cluster.sh"));
        for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("RIM_")) {
            cmd.env_remove(name);
        }
        cmd.arg(command)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .output()
            .expect("run deploy/local-cluster.sh")
    }
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        let _ = self.run("stop");
    }
}

/// One line of the cluster's procs.tsv.
struct Recorded {
    name: String,
    pid: u32,
    /// Start time in clock ticks since boot (field 22 of /proc/PID/stat).
    start: String,
    ports: BTreeMap<String, u16>,
}

fn recorded(state: &Path) -> Vec<Recorded> {
    read(&state.join("procs.tsv"))
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            let ports = f[5]
                .split(", ")
                .filter_map(|p| p.split_once(' '))
                .map(|(kind, port)| (kind.to_owned(), port.parse().unwrap()))
                .collect();
            Recorded {
                name: f[0].to_owned(),
                pid: f[3].parse().unwrap(),
                start: f[4].to_owned(),
                ports,
            }
        })
        .collect()
}

/// Whether the recorded process still runs (not a zombie, not a reused PID).
fn running(p: &Recorded) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", p.pid)) else {
        return false;
    };
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[0] != "Z" && fields.get(19) == Some(&p.start.as_str())
}

fn port(procs: &[Recorded], name: &str, kind: &str) -> u16 {
    let p = procs
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no {name} in procs.tsv"));
    *p.ports
        .get(kind)
        .unwrap_or_else(|| panic!("{name} has no {kind} port"))
}

fn require_tool(tool: &str) {
    let found = Path::new(tool).is_file()
        || std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        || dirs_cargo_bin().join(tool).is_file();
    assert!(
        found,
        "RIM_TEST_LOCAL_CLUSTER is set but {tool} is not installed: run deploy/test.sh"
    );
}

fn dirs_cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_default()
        .join("bin")
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs redis, zookeeper, tansu and postgresql: run deploy/test.sh"]
async fn local_cluster_starts_two_regions_delivers_across_them_and_stops_every_pid() {
    assert_eq!(
        std::env::var("RIM_TEST_LOCAL_CLUSTER").as_deref(),
        Ok("1"),
        "RIM_TEST_LOCAL_CLUSTER is not set: run deploy/test.sh"
    );
    for tool in [
        "redis-server",
        "tansu",
        "/usr/share/zookeeper/bin/zkServer.sh",
    ] {
        require_tool(tool);
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("cluster");
    let guard = ClusterGuard {
        env: vec![
            ("RIM_BIN".into(), env!("CARGO_BIN_EXE_rim").into()),
            ("RIM_CLUSTER_DIR".into(), state.display().to_string()),
            // Away from the script's default (23000) and deploy/test.sh's ports.
            ("RIM_CLUSTER_PORT_BASE".into(), "25000".into()),
            ("RIM_CLUSTER_ADMIN_TOKEN".into(), "test-admin".into()),
            ("RIM_CLUSTER_PUSH_TOKEN".into(), "test-push".into()),
            ("RIM_CLUSTER_GRPC_TOKEN".into(), "test-grpc".into()),
        ],
    };
    let out = guard.run("start");
    assert!(
        out.status.success(),
        "local-cluster.sh start failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    let procs = recorded(&state);
    let names: BTreeSet<&str> = procs.iter().map(|p| p.name.as_str()).collect();
    for name in [
        "redis",
        "zookeeper",
        "tansu",
        "postgres",
        "logic-a",
        "logic-b",
        "comet-a1",
        "comet-a2",
        "comet-b1",
        "comet-b2",
        "job-a",
        "job-b",
    ] {
        assert!(
            names.contains(name),
            "{name} not started; summary:\n{summary}"
        );
        assert!(
            summary.contains(name),
            "{name} not in the summary:\n{summary}"
        );
    }

    for p in &procs {
        assert!(
            running(p),
            "{} (pid {}) is not running after start",
            p.name,
            p.pid
        );
    }

    // Starting twice is refused.
    let again = guard.run("start");
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already running"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let status = guard.run("status");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );

    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let api_a = format!("http://127.0.0.1:{}", port(&procs, "logic-a", "http"));
    let api_b = format!("http://127.0.0.1:{}", port(&procs, "logic-b", "http"));

    // Both regions' comets are registered.
    let instances = support::get_json(&http, &format!("{api_b}/goim/nodes/instances")).await;
    let regions: BTreeMap<String, String> = instances["data"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap().to_owned(),
                n["region"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        regions.into_iter().collect::<Vec<_>>(),
        [
            ("comet-a1".to_owned(), "a".to_owned()),
            ("comet-a2".into(), "a".into()),
            ("comet-b1".into(), "b".into()),
            ("comet-b2".into(), "b".into())
        ]
    );

    // Node selection: the CIDR table puts 127.2.0.0/16 in region b.
    let from_b = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 2, 0, 1]))
        .build()
        .unwrap();
    let weighted = support::get_json(
        &from_b,
        &format!("{api_a}/goim/nodes/weighted?platform=web"),
    )
    .await;
    assert_eq!(weighted["data"]["region"], "b", "{weighted}");
    assert_eq!(
        weighted["data"]["instances"][0]["region"], "b",
        "{weighted}"
    );
    let weighted =
        support::get_json(&http, &format!("{api_a}/goim/nodes/weighted?platform=web")).await;
    assert_eq!(weighted["data"]["region"], "a", "{weighted}");

    // Every HTTP endpoint the static checks accept for probes answers.
    let mut endpoints = Vec::new();
    for name in ["logic-a", "logic-b"] {
        for path in API_ENDPOINTS {
            endpoints.push(format!(
                "http://127.0.0.1:{}{path}",
                port(&procs, name, "http")
            ));
        }
    }
    if binary_has_metrics() {
        for name in ["comet-a1", "comet-b2", "job-a", "job-b"] {
            endpoints.push(format!(
                "http://127.0.0.1:{}/metrics",
                port(&procs, name, "metrics")
            ));
        }
    }
    for url in endpoints {
        let answer = http
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert!(
            answer.status().is_success(),
            "GET {url}: {}",
            answer.status()
        );
    }

    // A client on a comet of region a gets a push sent through region b's API.
    let tcp_a1 = format!("127.0.0.1:{}", port(&procs, "comet-a1", "tcp"))
        .parse()
        .unwrap();
    let mut client = rim_client::Client::connect_tcp(tcp_a1).await.unwrap();
    client
        .auth(&rim_client::AuthToken {
            mid: 7001,
            key: "local-cluster-test".into(),
            room_id: "live://local-cluster".into(),
            platform: "test".into(),
            accepts: vec![1000],
        })
        .await
        .unwrap();
    // The cluster runs with every token set (comets, logics and jobs send
    // the gRPC token to each other): a push needs the push token.
    let refused = http
        .post(format!("{api_b}/goim/push/mids?operation=1000&mids=7001"))
        .body("no-token")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401, "a push without the push token");
    let pusher = {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            "Bearer test-push".parse().unwrap(),
        );
        reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .unwrap()
    };
    let pushed = support::post_ok(
        &pusher,
        &format!("{api_b}/goim/push/mids?operation=1000&mids=7001"),
        "from-region-b",
    )
    .await;
    assert_eq!(pushed["data"]["connections"], 1, "{pushed}");
    assert_eq!(support::next_push(&mut client).await, "from-region-b");
    support::post_ok(
        &pusher,
        &format!("{api_a}/goim/push/room?operation=1000&type=live&room=local-cluster"),
        "room-from-a",
    )
    .await;
    assert_eq!(support::next_push(&mut client).await, "room-from-a");
    let admin = http
        .get(format!("{api_a}/admin/comets"))
        .bearer_auth("test-admin")
        .send()
        .await
        .unwrap();
    assert!(
        admin.status().is_success(),
        "admin with the token: {}",
        admin.status()
    );
    drop(client);

    // Chat: a message sent on a comet of region a is stored (PostgreSQL,
    // shared by both logics) and reaches the recipient on region b.
    {
        use rim_proto::im::{Body, Code, Msg, SendReply, SendRequest};
        let chat = |mid: i64, key: &str| rim_client::AuthToken {
            mid,
            key: key.into(),
            accepts: vec![21, 27],
            ..rim_client::AuthToken::default()
        };
        let tcp_b1 = format!("127.0.0.1:{}", port(&procs, "comet-b1", "tcp"))
            .parse()
            .unwrap();
        let mut bob = rim_client::Client::connect_tcp(tcp_b1).await.unwrap();
        bob.auth(&chat(7003, "local-chat-bob")).await.unwrap();
        let mut alice = rim_client::Client::connect_tcp(tcp_a1).await.unwrap();
        alice.auth(&chat(7002, "local-chat-alice")).await.unwrap();
        let send = SendRequest {
            cmid: "local-1".into(),
            to: Some(7003),
            body: "across regions".into(),
            ..SendRequest::default()
        };
        let reply: SendReply = alice
            .request(&send, std::time::Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!((reply.code, reply.seq), (Code::OK, 1), "{reply:?}");
        let msg = loop {
            let frame = tokio::time::timeout(std::time::Duration::from_secs(30), bob.next_frame())
                .await
                .expect("MSG within 30 s")
                .unwrap()
                .expect("open");
            if frame.op == rim_proto::Op::IM_MSG {
                break Msg::decode(&frame.body).unwrap();
            }
        };
        assert_eq!((msg.body.as_str(), msg.sync), ("across regions", Some(1)));
    }

    // stop ends every recorded process and removes the state; twice is fine.
    let out = guard.run("stop");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in &procs {
        assert!(
            !running(p),
            "{} (pid {}) still runs after stop",
            p.name,
            p.pid
        );
    }
    assert!(!state.exists(), "stop left {}", state.display());
    let out = guard.run("stop");
    assert!(
        out.status.success(),
        "stop twice: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
