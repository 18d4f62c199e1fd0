use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use crate::*;

fn toml(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn load_err<T: Load + std::fmt::Debug>(file: Option<&str>, vars: &[(&str, &str)]) -> String {
    let file = file.map(toml);
    T::load_from(file.as_ref().map(|f| f.path()), env(vars))
        .expect_err("config should be rejected")
        .to_string()
}

#[test]
fn built_in_defaults_are_valid_for_every_role() {
    let standalone = StandaloneConfig::load_from(None, env(&[])).unwrap();
    assert_eq!(
        standalone.comet.tcp_bind,
        vec!["0.0.0.0:3101".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(standalone.comet.grpc_bind.port(), 3109);
    assert_eq!(standalone.api.http_bind.port(), 3111);
    assert_eq!(standalone.logic.grpc_bind.port(), 3119);
    assert_eq!(standalone.router.backend, RouterBackend::Memory);
    assert_eq!(standalone.queue.backend, QueueBackend::Memory);
    assert_eq!(standalone.job.group, "rim-job-default");
    assert!(!standalone.node.id.is_empty());

    let comet = CometRoleConfig::load_from(None, env(&TOKENS)).unwrap();
    assert_eq!(comet.discovery.backend, DiscoveryBackend::Zookeeper);
    let logic = LogicRoleConfig::load_from(None, env(&TOKENS)).unwrap();
    assert_eq!(logic.router.backend, RouterBackend::Redis);
    assert_eq!(logic.queue.backend, QueueBackend::Kafka);
    let job = JobRoleConfig::load_from(None, env(&[])).unwrap();
    assert_eq!(job.queue.topic, "rim-push");
}

#[test]
fn the_file_overrides_defaults_and_the_environment_overrides_the_file() {
    let file = toml(
        r#"
        [node]
        id = "comet-a"
        region = "eu"
        [comet]
        buckets = 64
        handshake_timeout = "2s"
        tcp_bind = ["127.0.0.1:4101", "[::1]:4101"]
        "#,
    );
    let config = CometRoleConfig::load_from(
        Some(file.path()),
        env(&[
            ("RIM_COMET__BUCKETS", "128"),
            ("RIM_COMET__WS_BIND", "127.0.0.1:4102,127.0.0.2:4102"),
            ("RIM_DISCOVERY__ROOT", "/rim-test"),
            TOKENS[0],
        ]),
    )
    .unwrap();
    assert_eq!(config.node.id, "comet-a");
    assert_eq!(config.node.region, "eu");
    assert_eq!(config.comet.buckets, 128);
    assert_eq!(config.comet.handshake_timeout, Duration::from_secs(2));
    assert_eq!(config.comet.tcp_bind.len(), 2);
    assert_eq!(
        config.comet.ws_bind,
        vec![
            "127.0.0.1:4102".parse::<SocketAddr>().unwrap(),
            "127.0.0.2:4102".parse().unwrap()
        ]
    );
    assert_eq!(config.discovery.root, "/rim-test");
    // Untouched keys keep their defaults.
    assert_eq!(config.comet.max_body, 4096);
}

#[test]
fn variables_without_a_section_separator_are_not_config() {
    let config = JobRoleConfig::load_from(
        None,
        env(&[
            ("RIM_TEST_REDIS", "redis://127.0.0.1:1"),
            ("RIM_LOG", "debug"),
            ("PATH", "/bin"),
        ]),
    );
    assert!(config.is_ok(), "{config:?}");
}

#[test]
fn an_unknown_key_in_the_file_is_rejected_by_name() {
    let err = load_err::<CometRoleConfig>(Some("[comet]\nbukets = 3\n"), &[]);
    assert!(err.contains("bukets"), "{err}");
    let err = load_err::<CometRoleConfig>(Some("[cmet]\nbuckets = 3\n"), &[]);
    assert!(err.contains("cmet"), "{err}");
}

#[test]
fn an_unknown_key_in_the_environment_is_rejected_by_name() {
    let err = load_err::<CometRoleConfig>(None, &[("RIM_COMET__BUKETS", "3")]);
    assert!(err.contains("bukets"), "{err}");
}

#[test]
fn a_section_of_another_role_is_unknown() {
    let err = load_err::<JobRoleConfig>(Some("[comet]\nbuckets = 3\n"), &[]);
    assert!(err.contains("comet"), "{err}");
}

#[test]
fn a_value_of_the_wrong_type_names_the_key() {
    let err = load_err::<CometRoleConfig>(Some("[comet]\nbuckets = \"many\"\n"), &[]);
    assert!(err.contains("buckets"), "{err}");
    let err = load_err::<CometRoleConfig>(Some("[comet]\ngrpc_bind = \"nowhere\"\n"), &[]);
    assert!(err.contains("grpc_bind"), "{err}");
    let err = load_err::<CometRoleConfig>(Some("[comet]\nhandshake_timeout = \"soon\"\n"), &[]);
    assert!(err.contains("handshake_timeout"), "{err}");
}

#[test]
fn an_out_of_range_value_names_the_key() {
    let err = load_err::<CometRoleConfig>(None, &[("RIM_COMET__BUCKETS", "0")]);
    assert_eq!(
        err,
        "invalid value for comet.buckets: must be between 1 and 4096, got 0"
    );
    let err = load_err::<CometRoleConfig>(Some("[comet]\nhandshake_timeout = \"0s\"\n"), &[]);
    assert!(
        err.starts_with("invalid value for comet.handshake_timeout"),
        "{err}"
    );
    let err = load_err::<LogicRoleConfig>(Some("[router]\nredis = [\"http://x\"]\n"), &[]);
    assert!(err.starts_with("invalid value for router.redis"), "{err}");
    let err = load_err::<JobRoleConfig>(Some("[discovery]\nroot = \"rim\"\n"), &[]);
    assert!(err.starts_with("invalid value for discovery.root"), "{err}");
}

#[test]
fn the_http_api_limits_name_their_key() {
    for key in [
        "header_read_timeout",
        "body_read_timeout",
        "keep_alive_timeout",
        "drain_timeout",
    ] {
        let var = format!("RIM_API__{}", key.to_uppercase());
        let err = load_err::<LogicRoleConfig>(None, &[(var.as_str(), "0s")]);
        assert!(
            err.starts_with(&format!("invalid value for api.{key}")),
            "{err}"
        );
    }
    let err = load_err::<StandaloneConfig>(None, &[("RIM_API__MAX_CONNECTIONS", "0")]);
    assert_eq!(
        err,
        "invalid value for api.max_connections: must be between 1 and 1000000, got 0"
    );
    let config = StandaloneConfig::load_from(None, env(&[])).unwrap();
    assert_eq!(config.api.header_read_timeout, Duration::from_secs(10));
    assert_eq!(config.api.max_connections, 1024);
}

#[test]
fn a_public_domain_is_a_host_name_or_empty() {
    let config = CometRoleConfig::load_from(None, env(&TOKENS)).unwrap();
    assert_eq!(config.comet.public_domain, "", "unset by default");
    let config = CometRoleConfig::load_from(
        None,
        env(&[
            ("RIM_COMET__PUBLIC_DOMAIN", "comet-1.im.example.com"),
            TOKENS[0],
        ]),
    )
    .unwrap();
    assert_eq!(config.comet.public_domain, "comet-1.im.example.com");
    for bad in [
        "wss://comet-1.example.com",
        "comet-1.example.com:3103",
        "comet-1.example.com/sub",
        "two words",
        "-comet.example.com",
        "comet..example.com",
    ] {
        let err = load_err::<CometRoleConfig>(None, &[("RIM_COMET__PUBLIC_DOMAIN", bad)]);
        assert!(
            err.starts_with("invalid value for comet.public_domain") && err.contains(bad),
            "{bad}: {err}"
        );
    }
    let err = load_err::<LogicRoleConfig>(
        Some(
            "[discovery]\nbackend = \"static\"\n[[discovery.comets]]\nid = \"c1\"\ngrpc = \"127.0.0.1:3109\"\ndomain = \"c1.example.com:443\"\n",
        ),
        &[],
    );
    assert!(
        err.starts_with("invalid value for discovery.comets[0].domain"),
        "{err}"
    );
}

#[test]
fn half_a_tls_pair_is_rejected() {
    let err = load_err::<CometRoleConfig>(Some("[comet]\ntls_cert = \"/etc/hostname\"\n"), &[]);
    assert!(err.starts_with("invalid value for comet.tls_key"), "{err}");
    let err = load_err::<CometRoleConfig>(
        Some("[comet]\ntls_cert = \"/nonexistent.pem\"\ntls_key = \"/nonexistent.key\"\n"),
        &[],
    );
    assert!(err.contains("/nonexistent.pem"), "{err}");
}

#[test]
fn grpc_tls_settings_are_checked() {
    let err = load_err::<JobRoleConfig>(Some("[node]\ntls_cert = \"/etc/hostname\"\n"), &[]);
    assert!(err.starts_with("invalid value for node.tls_key"), "{err}");
    let err = load_err::<JobRoleConfig>(Some("[node]\ntls_ca = \"/nonexistent/ca.pem\"\n"), &[]);
    assert!(
        err.starts_with("invalid value for node.tls_ca") && err.contains("/nonexistent/ca.pem"),
        "{err}"
    );
    let pair = "[node]\ntls_cert = \"/etc/hostname\"\ntls_key = \"/etc/hostname\"\n";
    let err = load_err::<JobRoleConfig>(Some(pair), &[]);
    assert!(err.starts_with("invalid value for node.tls_ca"), "{err}");
    let err = load_err::<JobRoleConfig>(Some("[node]\ntls_client_auth = true\n"), &[]);
    assert!(
        err.starts_with("invalid value for node.tls_client_auth"),
        "{err}"
    );
    // A CA alone makes a job's clients speak TLS; a comet or logic must then
    // serve TLS too, since its peers dial it with TLS.
    let ca_only = "[node]\ntls_ca = \"/etc/hostname\"\n";
    let job = JobRoleConfig::load_from(Some(toml(ca_only).path()), env(&TOKENS)).unwrap();
    assert_eq!(
        job.node.tls_ca.as_deref(),
        Some(std::path::Path::new("/etc/hostname"))
    );
    let err = load_err::<CometRoleConfig>(Some(ca_only), &TOKENS);
    assert!(err.starts_with("invalid value for node.tls_cert"), "{err}");
    let err = load_err::<LogicRoleConfig>(Some(ca_only), &TOKENS);
    assert!(err.starts_with("invalid value for node.tls_cert"), "{err}");
    let whole = format!("{pair}tls_ca = \"/etc/hostname\"\ntls_client_auth = true\n");
    let comet = CometRoleConfig::load_from(Some(toml(&whole).path()), env(&TOKENS)).unwrap();
    assert!(comet.node.tls_client_auth && comet.node.tls_cert.is_some());
    assert!(
        !CometRoleConfig::default().node.tls_client_auth,
        "plaintext by default"
    );
}

#[test]
fn api_tls_settings_are_checked() {
    let err = load_err::<LogicRoleConfig>(Some("[api]\ntls_key = \"/etc/hostname\"\n"), &TOKENS);
    assert!(err.starts_with("invalid value for api.tls_cert"), "{err}");
    let err = load_err::<LogicRoleConfig>(
        Some("[api]\ntls_cert = \"/etc/hostname\"\ntls_key = \"/nonexistent.key\"\n"),
        &TOKENS,
    );
    assert!(
        err.starts_with("invalid value for api.tls_key") && err.contains("/nonexistent.key"),
        "{err}"
    );
}

#[test]
fn kafka_security_properties_pass_through_and_nothing_else() {
    let file = toml(
        "[queue.kafka]\n\"security.protocol\" = \"SASL_SSL\"\nssl_ca_location = \"/etc/rim/kafka-ca.pem\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n",
    );
    let job = JobRoleConfig::load_from(
        Some(file.path()),
        env(&[("RIM_QUEUE__KAFKA__SASL_PASSWORD", "kafka-secret")]),
    )
    .unwrap();
    assert_eq!(
        job.queue.kafka_properties(),
        vec![
            ("sasl.mechanism".to_string(), "SCRAM-SHA-512".to_string()),
            ("sasl.password".to_string(), "kafka-secret".to_string()),
            ("security.protocol".to_string(), "SASL_SSL".to_string()),
            (
                "ssl.ca.location".to_string(),
                "/etc/rim/kafka-ca.pem".to_string()
            ),
        ]
    );
    assert!(
        JobRoleConfig::default().queue.kafka.is_empty(),
        "nothing by default"
    );
    let err = load_err::<JobRoleConfig>(Some("[queue.kafka]\n\"group.id\" = \"x\"\n"), &[]);
    assert!(
        err.starts_with("invalid value for queue.kafka.group.id"),
        "{err}"
    );
    let err = load_err::<JobRoleConfig>(Some("[queue.kafka]\nsecurity_protocol = \"tls\"\n"), &[]);
    assert!(
        err.starts_with("invalid value for queue.kafka.security.protocol"),
        "{err}"
    );
    let err = load_err::<JobRoleConfig>(Some("[queue.kafka]\nsasl_username = \" \"\n"), &[]);
    assert!(
        err.starts_with("invalid value for queue.kafka.sasl.username"),
        "{err}"
    );
}

#[test]
fn redis_tls_settings_are_checked() {
    let tls = "[router]\nbackend = \"redis\"\n";
    let err = load_err::<LogicRoleConfig>(
        Some(&format!(
            "{tls}redis = [\"rediss://a:6379\", \"redis://b:6379\"]\n"
        )),
        &[],
    );
    assert!(
        err.starts_with("invalid value for router.redis") && err.contains("mixes"),
        "{err}"
    );
    let err = load_err::<LogicRoleConfig>(
        Some(&format!(
            "{tls}redis = [\"redis://a:6379\"]\ntls_ca = \"/etc/hosts\"\n"
        )),
        &[],
    );
    assert!(
        err.starts_with("invalid value for router.tls_ca") && err.contains("rediss://"),
        "{err}"
    );
    let err = load_err::<LogicRoleConfig>(
        Some(&format!(
            "{tls}redis = [\"rediss://a:6379\"]\ntls_ca = \"/nonexistent/ca.pem\"\n"
        )),
        &[],
    );
    assert!(
        err.starts_with("invalid value for router.tls_ca") && err.contains("/nonexistent/ca.pem"),
        "{err}"
    );
    let ca = toml("-----BEGIN CERTIFICATE-----\n");
    let file = toml(&format!(
        "{tls}redis = [\"rediss://a:6379\", \"rediss://b:6379\"]\ntls_ca = {:?}\n",
        ca.path()
    ));
    let config =
        LogicRoleConfig::load_from(Some(file.path()), env(&TOKENS)).expect("valid TLS settings");
    assert_eq!(config.router.tls_ca.as_deref(), Some(ca.path()));
}

#[test]
fn a_comet_without_any_client_listener_is_rejected() {
    let err = load_err::<CometRoleConfig>(Some("[comet]\ntcp_bind = []\nws_bind = []\n"), &[]);
    assert!(err.starts_with("invalid value for comet.tcp_bind"), "{err}");
}

#[test]
fn standalone_checks_renewal_against_the_lease() {
    let err = load_err::<StandaloneConfig>(
        Some("[comet]\npresence_renew = \"40m\"\n[logic]\nlease = \"30m\"\n"),
        &[],
    );
    assert!(
        err.starts_with("invalid value for comet.presence_renew"),
        "{err}"
    );
}

#[test]
fn a_missing_file_is_an_error() {
    let err = StandaloneConfig::load_from(
        Some(std::path::Path::new("/nonexistent/rim.toml")),
        env(&[]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("/nonexistent/rim.toml"), "{err}");
}

#[test]
fn errors_are_one_line() {
    let err = load_err::<CometRoleConfig>(Some("[comet\nbuckets = 1\n"), &[]);
    assert!(!err.contains('\n'), "{err}");
}

#[test]
fn static_comets_load_from_the_file() {
    let file = toml(
        r#"
        [discovery]
        backend = "static"
        [[discovery.comets]]
        id = "c1"
        region = "eu"
        grpc = "127.0.0.1:3109"
        [[discovery.comets]]
        id = "c2"
        grpc = "127.0.0.1:4109"
        domain = "c2.example.com"
        "#,
    );
    let config = JobRoleConfig::load_from(Some(file.path()), env(&[])).unwrap();
    assert_eq!(config.discovery.backend, DiscoveryBackend::Static);
    assert_eq!(config.discovery.comets.len(), 2);
    assert_eq!(config.discovery.comets[1].region, "default");
    assert_eq!(
        (
            config.discovery.comets[0].domain.as_str(),
            config.discovery.comets[1].domain.as_str()
        ),
        ("", "c2.example.com")
    );
}

#[test]
fn overrides_for_another_roles_sections_are_ignored_but_typos_are_not() {
    let vars = [
        ("RIM_LOGIC__AUTH__POLICY", "jwt"),
        ("RIM_JOB__ROOM_BATCH", "5"),
    ];
    assert!(CometRoleConfig::load_from(None, env(&[&vars[..], &TOKENS[..1]].concat())).is_ok());
    let err = load_err::<CometRoleConfig>(None, &[("RIM_COMMET__BUCKETS", "3")]);
    assert!(err.contains("commet"), "{err}");
}

#[test]
fn nested_tables_override_from_the_environment() {
    let config = LogicRoleConfig::load_from(
        None,
        env(&[
            ("RIM_LOGIC__AUTH__POLICY", "webhook"),
            ("RIM_LOGIC__AUTH__WEBHOOK_URL", "http://127.0.0.1:9/auth"),
            TOKENS[0],
            TOKENS[1],
            TOKENS[2],
        ]),
    )
    .unwrap();
    assert_eq!(config.logic.auth.policy, AuthPolicy::Webhook);
    let err = load_err::<LogicRoleConfig>(None, &[("RIM_LOGIC__AUTH__POLICY", "jwt")]);
    assert!(
        err.starts_with("invalid value for logic.auth.jwt_secret"),
        "{err}"
    );
    let err = load_err::<LogicRoleConfig>(
        Some("[[logic.nodes.regions]]\ncidr = \"10.0.0.0/33\"\nregion = \"eu\"\n"),
        &[],
    );
    assert!(err.contains("prefix"), "{err}");
}

#[test]
fn metrics_listen_by_default_on_comets_and_jobs_and_can_be_disabled() {
    let comet = CometRoleConfig::load_from(None, env(&TOKENS)).unwrap();
    assert_eq!(comet.metrics.bind_addr().map(|a| a.port()), Some(3108));
    let job = JobRoleConfig::load_from(None, env(&[])).unwrap();
    assert_eq!(job.metrics.bind_addr().map(|a| a.port()), Some(3128));

    let moved =
        JobRoleConfig::load_from(None, env(&[("RIM_METRICS__BIND", "127.0.0.1:9128")])).unwrap();
    assert_eq!(
        moved.metrics.bind_addr(),
        Some("127.0.0.1:9128".parse().unwrap())
    );
    let file = toml("[metrics]\nbind = \"\"\n");
    let off = CometRoleConfig::load_from(Some(file.path()), env(&TOKENS)).unwrap();
    assert_eq!(off.metrics.bind_addr(), None);
    let off =
        CometRoleConfig::load_from(None, env(&[("RIM_METRICS__BIND", ""), TOKENS[0]])).unwrap();
    assert_eq!(off.metrics.bind_addr(), None);
    // Logic serves /metrics on the API listener only: no section, and an
    // override meant for a comet in the same environment is ignored.
    let vars = [&[("RIM_METRICS__BIND", "x")][..], &TOKENS[..]].concat();
    assert!(LogicRoleConfig::load_from(None, env(&vars)).is_ok());
    assert!(load_err::<LogicRoleConfig>(Some("[metrics]\nbind = \"\"\n"), &[]).contains("metrics"));
}

#[test]
fn standalone_serves_metrics_on_its_own_listener_only_when_asked() {
    let standalone = StandaloneConfig::load_from(None, env(&[])).unwrap();
    assert_eq!(standalone.metrics.bind_addr(), None);
    let separate =
        StandaloneConfig::load_from(None, env(&[("RIM_METRICS__BIND", "127.0.0.1:9108")])).unwrap();
    assert_eq!(
        separate.metrics.bind_addr(),
        Some("127.0.0.1:9108".parse().unwrap())
    );
    let err = load_err::<StandaloneConfig>(None, &[("RIM_METRICS__BIND", "3108")]);
    assert!(err.contains("metrics.bind"), "{err}");
}

#[test]
fn overrides_a_role_does_not_apply_are_named() {
    let vars = env(&[
        ("RIM_METRICS__BIND", "127.0.0.1:9108"),
        ("RIM_DISCOVERY__ZOOKEEPER", "zk:2181"),
        ("RIM_COMET__BUCKETS", "64"),
        ("RIM_TEST_REDIS", "redis://127.0.0.1:1"),
        ("RIM_COMMET__BUCKETS", "3"),
        ("PATH", "/bin"),
    ]);
    assert_eq!(
        StandaloneConfig::inapplicable_overrides(vars.clone()).unwrap(),
        vec!["RIM_DISCOVERY__ZOOKEEPER".to_string()]
    );
    assert_eq!(
        LogicRoleConfig::inapplicable_overrides(vars.clone()).unwrap(),
        vec![
            "RIM_METRICS__BIND".to_string(),
            "RIM_COMET__BUCKETS".to_string()
        ]
    );
    assert_eq!(
        CometRoleConfig::inapplicable_overrides(vars).unwrap(),
        Vec::<String>::new()
    );
}

#[test]
fn a_bad_metrics_address_names_the_key() {
    for bad in ["3108", "localhost", "0.0.0.0:99999"] {
        let err = load_err::<CometRoleConfig>(None, &[("RIM_METRICS__BIND", bad)]);
        assert!(err.contains("metrics.bind"), "{bad}: {err}");
        let err = load_err::<JobRoleConfig>(None, &[("RIM_METRICS__BIND", bad)]);
        assert!(err.contains("metrics.bind"), "{bad}: {err}");
    }
}

/// Tokens for every listener that can push or kick, as the shipped cluster
/// configs get them from the environment.
const TOKENS: [(&str, &str); 3] = [
    ("RIM_NODE__GRPC_TOKEN", "grpc-secret"),
    ("RIM_API__ADMIN_TOKEN", "admin-secret"),
    ("RIM_API__PUSH_TOKEN", "push-secret"),
];

#[test]
fn standalone_binds_its_api_and_grpc_to_loopback_by_default() {
    let standalone = StandaloneConfig::load_from(None, env(&[])).unwrap();
    assert_eq!(
        standalone.api.http_bind,
        "127.0.0.1:3111".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        standalone.comet.grpc_bind,
        "127.0.0.1:3109".parse::<SocketAddr>().unwrap()
    );
    // Client ports stay public; metrics have no listener of their own.
    assert!(standalone.comet.tcp_bind[0].ip().is_unspecified());
    assert!(standalone.comet.ws_bind[0].ip().is_unspecified());
    assert_eq!(standalone.metrics.bind_addr(), None);
    assert!(standalone.open_listeners().is_empty());
    // The other roles keep their public defaults (and so need tokens).
    assert!(
        CometRoleConfig::default()
            .comet
            .grpc_bind
            .ip()
            .is_unspecified()
    );
    assert!(
        LogicRoleConfig::default()
            .api
            .http_bind
            .ip()
            .is_unspecified()
    );
}

#[test]
fn a_public_http_api_without_tokens_is_refused_naming_the_key() {
    let public = ("RIM_API__HTTP_BIND", "0.0.0.0:0");
    for err in [
        load_err::<StandaloneConfig>(None, &[public]),
        load_err::<LogicRoleConfig>(None, &[public, TOKENS[0]]),
    ] {
        assert_eq!(
            err,
            "api.admin_token: required when api.http_bind (0.0.0.0:0) is not a loopback \
             address (or set node.allow_unauthenticated = true)"
        );
    }
    let err = load_err::<StandaloneConfig>(None, &[public, TOKENS[1]]);
    assert!(
        err.starts_with("api.push_token: required when api.http_bind (0.0.0.0:0)"),
        "{err}"
    );
    let err = load_err::<LogicRoleConfig>(None, &[public, TOKENS[0], TOKENS[2]]);
    assert!(err.starts_with("api.admin_token: required"), "{err}");
    // Both tokens set: it loads.
    LogicRoleConfig::load_from(None, env(&TOKENS)).unwrap();
    StandaloneConfig::load_from(None, env(&[public, TOKENS[1], TOKENS[2]])).unwrap();
}

#[test]
fn a_public_grpc_server_without_a_token_is_refused_naming_the_key() {
    let err = load_err::<CometRoleConfig>(None, &[]);
    assert_eq!(
        err,
        "node.grpc_token: required when comet.grpc_bind (0.0.0.0:3109) is not a loopback \
         address (or set node.allow_unauthenticated = true)"
    );
    let err = load_err::<LogicRoleConfig>(None, &TOKENS[1..]);
    assert!(
        err.starts_with("node.grpc_token: required when logic.grpc_bind (0.0.0.0:3119)"),
        "{err}"
    );
    let err = load_err::<StandaloneConfig>(None, &[("RIM_COMET__GRPC_BIND", "[::]:3109")]);
    assert!(
        err.starts_with("node.grpc_token: required when comet.grpc_bind ([::]:3109)"),
        "{err}"
    );
    CometRoleConfig::load_from(None, env(&TOKENS[..1])).unwrap();
    // Loopback binds need no token; the job serves nothing that can push.
    CometRoleConfig::load_from(None, env(&[("RIM_COMET__GRPC_BIND", "127.0.0.1:3109")])).unwrap();
    JobRoleConfig::load_from(None, env(&[])).unwrap();
}

#[test]
fn allow_unauthenticated_starts_open_listeners_and_names_them() {
    let allow = ("RIM_NODE__ALLOW_UNAUTHENTICATED", "true");
    let logic = LogicRoleConfig::load_from(None, env(&[allow, TOKENS[1]])).unwrap();
    let open: Vec<String> = logic
        .open_listeners()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        open,
        [
            "api.http_bind (0.0.0.0:3111) without api.push_token",
            "logic.grpc_bind (0.0.0.0:3119) without node.grpc_token",
        ]
    );
    let comet = CometRoleConfig::load_from(None, env(&[allow])).unwrap();
    assert_eq!(comet.open_listeners().len(), 1);
}

#[test]
fn tokens_are_visible_ascii() {
    for key in [
        "RIM_NODE__GRPC_TOKEN",
        "RIM_API__ADMIN_TOKEN",
        "RIM_API__PUSH_TOKEN",
    ] {
        for bad in ["", "two words", "tab\there", "caf\u{e9}"] {
            let err = load_err::<LogicRoleConfig>(None, &[(key, bad)]);
            let name = key
                .trim_start_matches("RIM_")
                .replace("__", ".")
                .to_lowercase();
            assert!(err.contains(&name), "{key}={bad:?}: {err}");
        }
    }
}

#[test]
fn im_settings_name_their_key() {
    let cases: [(&[(&str, &str)], &str); 12] = [
        (&[("RIM_IM__STORE", "postgres")], "im.postgres"),
        (
            &[
                ("RIM_IM__STORE", "postgres"),
                ("RIM_IM__POSTGRES", "mysql://x"),
            ],
            "im.postgres",
        ),
        (&[("RIM_IM__NODE", "1024")], "im.node"),
        (&[("RIM_IM__MAX_BODY", "0")], "im.max_body"),
        (&[("RIM_IM__ACK_TIMEOUT", "0s")], "im.ack_timeout"),
        (&[("RIM_IM__API_TOKEN", "has space")], "im.api_token"),
        (&[("RIM_IM__RETENTION_DAYS", "40000")], "im.retention_days"),
        (&[("RIM_IM__PRUNE_INTERVAL", "0s")], "im.prune_interval"),
        (&[("RIM_IM__PRUNE_BATCH", "0")], "im.prune_batch"),
        (
            &[("RIM_IM__SEND_BURST_PER_CONN", "0")],
            "im.send_burst_per_conn",
        ),
        (
            &[("RIM_IM__SEND_RATE_PER_USER", "1000001")],
            "im.send_rate_per_user",
        ),
        (&[("RIM_IM__API_WRITE_BURST", "0")], "im.api_write_burst"),
    ];
    for (vars, key) in cases {
        let err = load_err::<StandaloneConfig>(None, vars);
        assert!(
            err.starts_with(&format!("invalid value for {key}")),
            "{vars:?}: {err}"
        );
    }
    let err = load_err::<StandaloneConfig>(None, &[("RIM_IM__STORE", "mongo")]);
    assert!(err.contains("im.store"), "{err}");
}

#[test]
fn a_postgres_url_may_name_a_primary_and_its_standbys() {
    let open = ("RIM_NODE__ALLOW_UNAUTHENTICATED", "true");
    let store = ("RIM_IM__STORE", "postgres");
    let list = "postgres://rim:secret@10.0.0.1:5432,10.0.0.2:5432,[::1]:5433/rim\
                ?target_session_attrs=read-write&application_name=rim";
    // From the environment the host list's commas stay in the URL.
    let logic =
        LogicRoleConfig::load_from(None, env(&[open, store, ("RIM_IM__POSTGRES", list)])).unwrap();
    assert_eq!(logic.im.postgres, [list]);
    let file = format!("[im]\nstore = \"postgres\"\npostgres = [\"{list}\"]\n");
    let logic = LogicRoleConfig::load_from(Some(toml(&file).path()), env(&[open])).unwrap();
    assert_eq!(logic.im.postgres, [list]);
    for fine in [
        "postgres://rim@db/rim",
        "postgresql://rim@db:5432/rim?target_session_attrs=any",
        "postgres://rim@[::1]/rim",
        "postgres://%2Fvar%2Frun%2Fpostgresql/rim",
    ] {
        LogicRoleConfig::load_from(None, env(&[open, store, ("RIM_IM__POSTGRES", fine)]))
            .unwrap_or_else(|e| panic!("{fine}: {e}"));
    }
    for (bad, says) in [
        (
            "postgres://rim@h1:5432,h2:5432/rim",
            "names 2 hosts (a primary and its standbys) but not ?target_session_attrs=read-write",
        ),
        (
            "postgres://rim@h1,h2/rim?target_session_attrs=any",
            "names 2 hosts",
        ),
        (
            "postgres://rim@h1/rim?target_session_attrs=read-only",
            "it must be read-write",
        ),
        (
            "postgres://rim@h1,,h2/rim?target_session_attrs=read-write",
            "host 2: empty",
        ),
        (
            "postgres://rim:pw@h1:54x2/rim",
            "host 1: port \"54x2\" of h1 is not a number",
        ),
        ("postgres://rim@h1:0/rim", "is not a number from 1 to 65535"),
        ("postgres://rim@[::1/rim", "has no closing ']'"),
        ("postgres://rim@/rim", "the URL names no host"),
        (
            "postgres://rim@h1/rim?sslmode",
            "parameter \"sslmode\" has no value",
        ),
        ("mysql://rim@h1/rim", "not a postgres:// URL"),
    ] {
        let err = load_err::<LogicRoleConfig>(None, &[open, store, ("RIM_IM__POSTGRES", bad)]);
        assert!(
            err.starts_with("invalid value for im.postgres") && err.contains(says),
            "{bad}: {err}"
        );
        assert!(!err.contains("pw"), "the password is not repeated: {err}");
    }
    // Two URLs are two primaries, each checked.
    let two = "postgres://rim@h1/rim,postgres://rim@h2/rim";
    let logic =
        LogicRoleConfig::load_from(None, env(&[open, store, ("RIM_IM__POSTGRES", two)])).unwrap();
    assert_eq!(logic.im.postgres.len(), 2);
    let err = load_err::<LogicRoleConfig>(
        None,
        &[
            open,
            store,
            ("RIM_IM__POSTGRES", "postgres://rim@h1/rim,mysql://h2/rim"),
        ],
    );
    assert!(err.contains("not a postgres:// URL"), "{err}");
}

#[test]
fn a_shard_map_names_bucket_ranges_of_the_listed_primaries() {
    let open = ("RIM_NODE__ALLOW_UNAUTHENTICATED", "true");
    let store = ("RIM_IM__STORE", "postgres");
    let two = (
        "RIM_IM__POSTGRES",
        "postgres://rim@h1/rim,postgres://rim@h2/rim",
    );
    let file = "[im]\nshard_map = [\"0-99=1\", \"100-1023=0\"]\n";
    let logic =
        LogicRoleConfig::load_from(Some(toml(file).path()), env(&[open, store, two])).unwrap();
    assert_eq!(
        logic.im.shard_ranges().unwrap(),
        [(0, 99, 1), (100, 1023, 0)]
    );
    for (bad, says) in [
        ("0-99", "no '='"),
        ("0:99=1", "no '-'"),
        ("0-1024=1", "not a number in range"),
        ("99-0=1", "the first bucket is after the last"),
        ("0-1023=2", "primary 2, but im.postgres lists 2"),
        ("0-1023=x", "the primary is not a number"),
    ] {
        let file = format!("[im]\nshard_map = [\"{bad}\"]\n");
        let err = LogicRoleConfig::load_from(Some(toml(&file).path()), env(&[open, store, two]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("im.shard_map") && err.contains(says),
            "{bad}: {err}"
        );
    }
}

#[test]
fn im_rate_limits_default_on_and_zero_turns_one_off() {
    let config = StandaloneConfig::load_from(None, env(&[])).unwrap();
    let limit = |rate: u32, burst: u32| {
        Some(crate::RateLimit {
            rate: rate.try_into().unwrap(),
            burst: burst.try_into().unwrap(),
        })
    };
    assert_eq!(config.im.send_limit_per_conn(), limit(20, 40));
    assert_eq!(config.im.send_limit_per_user(), limit(50, 100));
    assert_eq!(config.im.api_write_limit(), limit(2000, 4000));
    // Off: a rate of 0, whatever the burst (0 too).
    let off = StandaloneConfig::load_from(
        None,
        env(&[
            ("RIM_IM__SEND_RATE_PER_CONN", "0"),
            ("RIM_IM__SEND_BURST_PER_CONN", "0"),
            ("RIM_IM__API_WRITE_RATE", "0"),
        ]),
    )
    .unwrap();
    assert_eq!(off.im.send_limit_per_conn(), None);
    assert_eq!(off.im.api_write_limit(), None);
    assert_eq!(off.im.send_limit_per_user(), limit(50, 100));
}

#[test]
fn standalone_keeps_im_in_sqlite_and_logic_needs_a_store() {
    let standalone = StandaloneConfig::load_from(None, env(&[])).unwrap();
    assert_eq!(standalone.im.store, crate::ImStore::Sqlite);
    assert_eq!(standalone.im.sqlite_synchronous, crate::SqliteSync::Full);
    let open = ("RIM_NODE__ALLOW_UNAUTHENTICATED", "true");
    let logic = LogicRoleConfig::load_from(None, env(&[open])).unwrap();
    assert_eq!(logic.im.store, crate::ImStore::Off);
    let logic = LogicRoleConfig::load_from(
        None,
        env(&[
            open,
            ("RIM_IM__STORE", "postgres"),
            ("RIM_IM__POSTGRES", "postgres://rim@127.0.0.1:5432/rim"),
        ]),
    )
    .unwrap();
    assert_eq!(logic.im.postgres, ["postgres://rim@127.0.0.1:5432/rim"]);
    // The id node is stable for a node id, and explicit when set.
    assert_eq!(logic.im.id_node("logic-1"), logic.im.id_node("logic-1"));
    assert!(logic.im.id_node("logic-1") <= 1023);
    let pinned = crate::ImConfig {
        node: Some(7),
        ..crate::ImConfig::default()
    };
    assert_eq!(pinned.id_node("anything"), 7);
}

#[test]
fn the_fetch_wait_names_its_key() {
    for bad in ["0s", "301s"] {
        let err = load_err::<StandaloneConfig>(None, &[("RIM_QUEUE__FETCH_WAIT", bad)]);
        assert!(
            err.starts_with("invalid value for queue.fetch_wait"),
            "{bad}: {err}"
        );
    }
    let config = StandaloneConfig::load_from(None, env(&[])).unwrap();
    assert_eq!(config.queue.fetch_wait, Duration::from_millis(5));
}

#[test]
fn the_producer_linger_names_its_key() {
    let err = load_err::<StandaloneConfig>(None, &[("RIM_QUEUE__LINGER", "2s")]);
    assert!(err.starts_with("invalid value for queue.linger"), "{err}");
    let config = StandaloneConfig::load_from(None, env(&[("RIM_QUEUE__LINGER", "0s")])).unwrap();
    assert_eq!(config.queue.linger, Duration::ZERO, "0 = send at once");
    let config = StandaloneConfig::load_from(None, env(&[])).unwrap();
    assert_eq!(config.queue.linger, Duration::from_millis(1));
}

#[test]
fn produce_in_flight_is_one_to_five() {
    for bad in ["0", "6"] {
        let err = load_err::<StandaloneConfig>(None, &[("RIM_QUEUE__PRODUCE_IN_FLIGHT", bad)]);
        assert!(
            err.starts_with("invalid value for queue.produce_in_flight"),
            "{err}"
        );
    }
    let config =
        StandaloneConfig::load_from(None, env(&[("RIM_QUEUE__PRODUCE_IN_FLIGHT", "5")])).unwrap();
    assert_eq!(config.queue.produce_in_flight, 5);
    let config = StandaloneConfig::load_from(None, env(&[])).unwrap();
    assert_eq!(config.queue.produce_in_flight, 1);
}

#[test]
fn consumer_group_keys_default_to_static_membership_from_the_node_id() {
    let job = JobRoleConfig::load_from(None, env(&[("RIM_NODE__ID", "job-7")])).unwrap();
    assert_eq!(job.queue.session_timeout, Duration::from_secs(10));
    assert_eq!(job.queue.heartbeat_interval, Duration::from_secs(1));
    assert_eq!(
        job.queue.assignment_strategy,
        AssignmentStrategy::CooperativeSticky
    );
    assert_eq!(
        job.queue.group_instance(&job.node).as_deref(),
        Some("job-7")
    );
    let named =
        JobRoleConfig::load_from(None, env(&[("RIM_QUEUE__GROUP_INSTANCE_ID", "member.a_1")]))
            .unwrap();
    assert_eq!(
        named.queue.group_instance(&named.node).as_deref(),
        Some("member.a_1")
    );
    let dynamic = JobRoleConfig::load_from(
        None,
        env(&[
            ("RIM_QUEUE__STATIC_MEMBERSHIP", "false"),
            ("RIM_QUEUE__ASSIGNMENT_STRATEGY", "range"),
        ]),
    )
    .unwrap();
    assert_eq!(dynamic.queue.group_instance(&dynamic.node), None);
    assert_eq!(dynamic.queue.assignment_strategy.as_str(), "range");
}

#[test]
fn consumer_group_keys_name_themselves() {
    for (key, vars) in [
        (
            "queue.session_timeout",
            vec![("RIM_QUEUE__SESSION_TIMEOUT", "500ms")],
        ),
        (
            "queue.session_timeout",
            vec![("RIM_QUEUE__SESSION_TIMEOUT", "301s")],
        ),
        (
            "queue.heartbeat_interval",
            vec![("RIM_QUEUE__HEARTBEAT_INTERVAL", "10ms")],
        ),
        (
            "queue.heartbeat_interval",
            vec![
                ("RIM_QUEUE__SESSION_TIMEOUT", "3s"),
                ("RIM_QUEUE__HEARTBEAT_INTERVAL", "3s"),
            ],
        ),
        (
            "queue.group_instance_id",
            vec![("RIM_QUEUE__GROUP_INSTANCE_ID", "a b")],
        ),
        (
            "queue.assignment_strategy",
            vec![("RIM_QUEUE__ASSIGNMENT_STRATEGY", "sticky")],
        ),
        // Derived from the node id, which must then be a valid instance id.
        ("node.id", vec![("RIM_NODE__ID", "job/1")]),
    ] {
        let err = load_err::<JobRoleConfig>(None, &vars);
        assert!(err.contains(key), "{vars:?}: {err}");
    }
    // Without static membership the node id is not an instance id.
    JobRoleConfig::load_from(
        None,
        env(&[
            ("RIM_NODE__ID", "job/1"),
            ("RIM_QUEUE__STATIC_MEMBERSHIP", "false"),
        ]),
    )
    .unwrap();
}

#[test]
fn presence_event_keys_name_themselves() {
    let config = StandaloneConfig::load_from(None, env(&[])).unwrap();
    assert!(config.logic.presence_webhook.is_empty());
    assert_eq!(config.logic.presence_debounce, Duration::from_secs(5));
    assert_eq!(config.logic.presence_attempts, 5);
    let config = StandaloneConfig::load_from(
        Some(
            toml("[logic]\npresence_webhook = \"http://127.0.0.1:9/p\"\npresence_debounce = \"0s\"\n")
                .path(),
        ),
        env(&[("RIM_LOGIC__PRESENCE_QUEUE", "7")]),
    )
    .unwrap();
    assert_eq!(config.logic.presence_webhook, "http://127.0.0.1:9/p");
    assert_eq!(config.logic.presence_debounce, Duration::ZERO);
    assert_eq!(config.logic.presence_queue, 7);

    let err = load_err::<StandaloneConfig>(None, &[("RIM_LOGIC__PRESENCE_WEBHOOK", "ftp://x")]);
    assert!(
        err.starts_with("invalid value for logic.presence_webhook"),
        "{err}"
    );
    let err = load_err::<LogicRoleConfig>(None, &[("RIM_LOGIC__PRESENCE_ATTEMPTS", "0")]);
    assert_eq!(
        err,
        "invalid value for logic.presence_attempts: must be between 1 and 20, got 0"
    );
    let err = load_err::<StandaloneConfig>(None, &[("RIM_LOGIC__PRESENCE_QUEUE", "0")]);
    assert!(
        err.starts_with("invalid value for logic.presence_queue"),
        "{err}"
    );
    let err = load_err::<StandaloneConfig>(None, &[("RIM_LOGIC__PRESENCE_DEBOUNCE", "2h")]);
    assert!(
        err.starts_with("invalid value for logic.presence_debounce"),
        "{err}"
    );
    let err = load_err::<StandaloneConfig>(None, &[("RIM_LOGIC__PRESENCE_TIMEOUT", "0s")]);
    assert!(
        err.starts_with("invalid value for logic.presence_timeout"),
        "{err}"
    );
}

#[test]
fn the_room_flush_rule_defaults_to_adaptive_and_names_its_key() {
    let job = JobRoleConfig::load_from(None, env(&[])).unwrap();
    assert_eq!(job.job.room_flush_rule, RoomFlushRule::Adaptive);
    assert_eq!(job.job.room_flush, Duration::from_millis(50));
    let fixed = JobRoleConfig::load_from(
        Some(toml("[job]\nroom_flush_rule = \"fixed\"\n").path()),
        env(&[]),
    )
    .unwrap();
    assert_eq!(fixed.job.room_flush_rule, RoomFlushRule::Fixed);
    let err = load_err::<StandaloneConfig>(None, &[("RIM_JOB__ROOM_FLUSH_RULE", "nagle")]);
    assert!(err.contains("job.room_flush_rule"), "{err}");
    assert!(err.contains("adaptive") && err.contains("fixed"), "{err}");
}

#[test]
fn worker_threads_default_to_one_per_core() {
    let config = StandaloneConfig::load_from(None, env(&[])).unwrap();
    assert_eq!(config.node.worker_threads, 0);
    let config =
        StandaloneConfig::load_from(None, env(&[("RIM_NODE__WORKER_THREADS", "1")])).unwrap();
    assert_eq!(config.node.worker_threads, 1);
    let err = load_err::<StandaloneConfig>(None, &[("RIM_NODE__WORKER_THREADS", "5000")]);
    assert!(
        err.starts_with("invalid value for node.worker_threads"),
        "{err}"
    );
}
