//! The `rim` binary's command line: roles listed, bad configuration refused
//! with exit code 64 and one line naming the key, `--check` round trips.

use std::path::Path;
use std::process::{Command, Output};

fn rim(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rim"));
    cmd.args(args);
    // Make the test independent of the caller's RIM_* overrides.
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("RIM_")) {
        cmd.env_remove(name);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("rim binary runs")
}

/// The tokens the shipped cluster configs expect from the environment.
const TOKENS: [(&str, &str); 3] = [
    ("RIM_NODE__GRPC_TOKEN", "grpc-secret"),
    ("RIM_API__ADMIN_TOKEN", "admin-secret"),
    ("RIM_API__PUSH_TOKEN", "push-secret"),
];

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn shipped(role: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/config")
        .join(format!("{role}.toml"))
        .display()
        .to_string()
}

#[test]
fn help_lists_every_role() {
    let output = rim(&["--help"], &[]);
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    for role in ["standalone", "comet", "logic", "job"] {
        assert!(text.contains(role), "--help does not list {role}:\n{text}");
    }
}

#[test]
fn an_unknown_key_exits_64_with_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("comet.toml");
    std::fs::write(&path, "[comet]\nbukets = 3\n").unwrap();
    let output = rim(&["comet", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(64));
    let err = stderr(&output);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("bukets"), "{err}");
}

#[test]
fn an_invalid_environment_value_exits_64_naming_the_key() {
    for role in ["standalone", "comet"] {
        let output = rim(&[role, "--check"], &[("RIM_COMET__MAX_BODY", "-1")]);
        assert_eq!(output.status.code(), Some(64), "{role}");
        assert!(
            stderr(&output).contains("comet.max_body"),
            "{}",
            stderr(&output)
        );
    }
    let output = rim(&["logic", "--check"], &[("RIM_LOGIC__HEARTBEAT_MAX", "0")]);
    assert_eq!(output.status.code(), Some(64));
    assert!(
        stderr(&output).contains("logic.heartbeat_max"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_missing_config_file_exits_64() {
    let output = rim(&["job", "--config", "/nonexistent/job.toml"], &[]);
    assert_eq!(output.status.code(), Some(64));
    assert!(stderr(&output).contains("/nonexistent/job.toml"));
}

#[test]
fn check_prints_a_config_that_loads_back_the_same() {
    let secret = [
        (
            "RIM_LOGIC__AUTH__JWT_SECRET",
            "0123456789abcdef0123456789abcdef",
        ),
        TOKENS[0],
        TOKENS[1],
        TOKENS[2],
    ];
    for role in ["standalone", "comet", "logic", "job"] {
        let first = rim(&[role, "--check", "--config", &shipped(role)], &secret);
        assert!(first.status.success(), "{role}: {}", stderr(&first));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("effective.toml");
        std::fs::write(&path, &first.stdout).unwrap();
        let second = rim(
            &[role, "--check", "--config", path.to_str().unwrap()],
            &secret,
        );
        assert!(second.status.success(), "{role}: {}", stderr(&second));
        assert_eq!(first.stdout, second.stdout, "{role}");
    }
}

#[test]
fn the_environment_overrides_the_file() {
    let output = rim(
        &["comet", "--check", "--config", &shipped("comet")],
        &[
            ("RIM_COMET__BUCKETS", "7"),
            ("RIM_NODE__REGION", "eu-west"),
            TOKENS[0],
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let effective: toml::Table = String::from_utf8_lossy(&output.stdout).parse().unwrap();
    assert_eq!(effective["comet"]["buckets"].as_integer(), Some(7));
    assert_eq!(effective["node"]["region"].as_str(), Some("eu-west"));
}

#[test]
fn comet_and_job_show_their_metrics_listener_and_refuse_a_bad_one() {
    for (role, bind) in [("comet", "0.0.0.0:3108"), ("job", "0.0.0.0:3128")] {
        let output = rim(&[role, "--check", "--config", &shipped(role)], &TOKENS);
        assert!(output.status.success(), "{role}: {}", stderr(&output));
        let effective: toml::Table = String::from_utf8_lossy(&output.stdout).parse().unwrap();
        assert_eq!(effective["metrics"]["bind"].as_str(), Some(bind), "{role}");

        for bad in ["3108", "metrics.example:x"] {
            let output = rim(&[role, "--check"], &[("RIM_METRICS__BIND", bad)]);
            assert_eq!(output.status.code(), Some(64), "{role} {bad}");
            let err = stderr(&output);
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
            assert!(err.contains("metrics.bind"), "{role} {bad}: {err}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("role.toml");
    std::fs::write(&path, "[metrics]\nbind = \"127.0.0.1:9108\"\n").unwrap();
    // Logic serves /metrics on the API listener only: no section.
    let output = rim(
        &["logic", "--check", "--config", path.to_str().unwrap()],
        &[],
    );
    assert_eq!(output.status.code(), Some(64));
    assert!(stderr(&output).contains("metrics"), "{}", stderr(&output));
    // Standalone serves it there, and on metrics.bind when set (default: none).
    let output = rim(&["standalone", "--check"], &[]);
    let effective: toml::Table = String::from_utf8_lossy(&output.stdout).parse().unwrap();
    assert_eq!(effective["metrics"]["bind"].as_str(), Some(""));
    let output = rim(
        &["standalone", "--check", "--config", path.to_str().unwrap()],
        &[],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let effective: toml::Table = String::from_utf8_lossy(&output.stdout).parse().unwrap();
    assert_eq!(
        effective["metrics"]["bind"].as_str(),
        Some("127.0.0.1:9108")
    );
}

#[test]
fn an_override_the_role_does_not_apply_is_named_in_a_startup_warning() {
    let vars = [
        ("RUST_LOG", "info"),
        ("RIM_METRICS__BIND", "127.0.0.1:9108"),
        ("RIM_DISCOVERY__ZOOKEEPER", "zk:2181"),
        TOKENS[0],
        TOKENS[1],
        TOKENS[2],
    ];
    let output = rim(&["logic", "--check"], &vars);
    assert!(output.status.success(), "{}", stderr(&output));
    let err = stderr(&output);
    let warned = |name: &str| {
        err.lines()
            .any(|line| line.contains(name) && line.contains("ignored"))
    };
    assert!(warned("RIM_METRICS__BIND"), "{err}");
    assert!(!warned("RIM_DISCOVERY__ZOOKEEPER"), "{err}");

    // Standalone applies RIM_METRICS__BIND and has no discovery.
    let output = rim(&["standalone", "--check"], &vars);
    assert!(output.status.success(), "{}", stderr(&output));
    let err = stderr(&output);
    let warned = |name: &str| {
        err.lines()
            .any(|line| line.contains(name) && line.contains("ignored"))
    };
    assert!(!warned("RIM_METRICS__BIND"), "{err}");
    assert!(warned("RIM_DISCOVERY__ZOOKEEPER"), "{err}");
    let effective: toml::Table = String::from_utf8_lossy(&output.stdout).parse().unwrap();
    assert_eq!(
        effective["metrics"]["bind"].as_str(),
        Some("127.0.0.1:9108")
    );
}

#[test]
fn the_job_role_needs_kafka() {
    let output = rim(
        &["job", "--config", &shipped("job")],
        &[
            ("RIM_QUEUE__BACKEND", "memory"),
            ("RIM_DISCOVERY__BACKEND", "static"),
            ("RIM_METRICS__BIND", "127.0.0.1:0"),
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("queue.backend"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn the_comet_role_serves_until_sigterm_then_exits_cleanly() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rim"));
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("RIM_")) {
        cmd.env_remove(name);
    }
    let mut child = cmd
        .args(["comet", "--config", &shipped("comet")])
        .envs([
            ("RIM_DISCOVERY__BACKEND", "static"),
            ("RIM_DISCOVERY__LOGICS", "127.0.0.1:1"),
            ("RIM_COMET__TCP_BIND", "127.0.0.1:0"),
            ("RIM_COMET__WS_BIND", "127.0.0.1:0"),
            ("RIM_COMET__GRPC_BIND", "127.0.0.1:0"),
            ("RIM_COMET__DRAIN_WINDOW", "100ms"),
            ("RIM_METRICS__BIND", "127.0.0.1:0"),
            ("RUST_LOG", "info"),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("rim comet starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let started = lines
        .by_ref()
        .take(50)
        .map_while(Result::ok)
        .any(|line| line.contains("accepting clients"));
    assert!(started, "rim comet did not start accepting");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("rim comet did not stop within 15 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit:?}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("comet stopped")), "{rest:?}");
}

#[test]
fn an_unreachable_zookeeper_fails_startup_clearly() {
    let output = rim(
        &["comet", "--config", &shipped("comet")],
        &[
            ("RIM_COMET__TCP_BIND", "127.0.0.1:0"),
            ("RIM_COMET__WS_BIND", "127.0.0.1:0"),
            ("RIM_COMET__GRPC_BIND", "127.0.0.1:0"),
            ("RIM_DISCOVERY__ZOOKEEPER", "127.0.0.1:1"),
            ("RIM_DISCOVERY__SESSION_TIMEOUT", "2s"),
            ("RIM_METRICS__BIND", "127.0.0.1:0"),
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("discovery"), "{}", stderr(&output));
}

#[test]
fn a_public_api_without_tokens_refuses_to_start_naming_the_key() {
    // The input: the API bound to every interface, no token set.
    let public = ("RIM_API__HTTP_BIND", "0.0.0.0:0");
    let runs = [
        (vec!["logic", "--check"], vec![public, TOKENS[0]]),
        (vec!["standalone", "--check"], vec![public]),
        // Not only --check: the role itself exits before binding anything.
        (vec!["standalone"], vec![public]),
    ];
    for (args, env) in runs {
        let output = rim(&args, &env);
        assert_eq!(output.status.code(), Some(64), "{args:?}");
        let err = stderr(&output);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.contains(
                "api.admin_token: required when api.http_bind (0.0.0.0:0) is not a loopback address"
            ),
            "{args:?}: {err}"
        );
    }
    // With the admin token, the push token is named next.
    let output = rim(&["standalone", "--check"], &[public, TOKENS[1]]);
    assert_eq!(output.status.code(), Some(64));
    assert!(
        stderr(&output).contains("api.push_token: required"),
        "{}",
        stderr(&output)
    );
    // A public comet gRPC needs node.grpc_token.
    let output = rim(&["comet", "--check"], &[]);
    assert_eq!(output.status.code(), Some(64));
    assert!(
        stderr(&output).contains("node.grpc_token: required when comet.grpc_bind (0.0.0.0:3109)"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn allow_unauthenticated_starts_with_a_warning_naming_what_is_open() {
    let output = rim(
        &["logic", "--check"],
        &[
            ("RUST_LOG", "warn"),
            ("RIM_NODE__ALLOW_UNAUTHENTICATED", "true"),
            TOKENS[1],
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let err = stderr(&output);
    for open in [
        "api.http_bind (0.0.0.0:3111) without api.push_token",
        "logic.grpc_bind (0.0.0.0:3119) without node.grpc_token",
    ] {
        assert!(
            err.lines().any(|l| l.contains("WARN") && l.contains(open)),
            "{open}: {err}"
        );
    }
}

#[test]
fn standalone_binds_the_api_and_grpc_to_loopback_by_default() {
    let output = rim(&["standalone", "--check"], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let effective: toml::Table = String::from_utf8_lossy(&output.stdout).parse().unwrap();
    assert_eq!(
        effective["api"]["http_bind"].as_str(),
        Some("127.0.0.1:3111")
    );
    assert_eq!(
        effective["comet"]["grpc_bind"].as_str(),
        Some("127.0.0.1:3109")
    );
    // Client ports stay public.
    assert_eq!(
        effective["comet"]["tcp_bind"][0].as_str(),
        Some("0.0.0.0:3101")
    );
    assert_eq!(
        effective["node"]["allow_unauthenticated"].as_bool(),
        Some(false)
    );
}

#[test]
fn standalone_says_at_startup_that_the_api_and_grpc_are_loopback_only() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rim"));
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("RIM_")) {
        cmd.env_remove(name);
    }
    // The default binds with port 0, so the test can run anywhere.
    let mut child = cmd
        .args(["standalone"])
        .envs([
            ("RIM_COMET__TCP_BIND", "127.0.0.1:0"),
            ("RIM_COMET__WS_BIND", "127.0.0.1:0"),
            ("RIM_COMET__GRPC_BIND", "127.0.0.1:0"),
            ("RIM_API__HTTP_BIND", "127.0.0.1:0"),
            ("RIM_COMET__DRAIN_WINDOW", "100ms"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("rim standalone starts");
    let lines: Vec<String> = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .take_while(|line| !line.contains("try:"))
        .take(30)
        .collect();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("rim standalone did not stop within 15 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        lines.iter().any(|l| l.contains(
            "push/admin API (127.0.0.1:0) and comet gRPC (127.0.0.1:0) are loopback-only"
        )),
        "{lines:#?}"
    );
}
