//! rim-bench: rim's load generator, one subcommand per benchmark.
//!
//! Every benchmark sends traffic to 127.0.0.0/8 only (it refuses other
//! addresses), runs for a bounded time and prints a progress line per second.
//! Method: `docs/benchmarks.md` and the shared benchmarking rules.

mod addrs;
mod baseline;
mod clientproc;
mod cluster;
mod connections;
mod fanout;
mod fleet;
mod im_abuser;
mod im_catchup;
mod im_device;
mod im_history;
mod im_raw;
mod im_send;
mod im_store;
mod latency;
mod options;
mod pacing;
mod plot;
mod procstat;
mod push_latency;
mod receiver;
mod room_routes;
mod wire;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// rim's load generator.
#[derive(Debug, Parser)]
#[command(name = "rim-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pushes/s and p50/p99 latency from an HTTP push to its receipt by
    /// clients, for unicast (push to one key) or room pushes. Plots: latency
    /// CDF, deliveries/s over time.
    PushLatency(push_latency::Args),
    /// Idle connections: comet RSS per connection and idle CPU with
    /// heartbeats, over one or several comets and load-generator processes.
    /// Plot: connections and comet RSS over time.
    Connections(connections::Args),
    /// Room fan-out: deliveries per server CPU-second of rim's comets,
    /// unbatched and op-9 batched, next to a raw tokio baseline. Plots:
    /// deliveries/s over time, latency CDF, deliveries per CPU-second by rate.
    Fanout(fanout::Args),
    /// 1:1 chat through `rim standalone` (SQLite, synchronous FULL): msg/s
    /// and p50/p99 SEND → SEND_REPLY and SEND → MSG at offered rates, beside
    /// raw batched SQLite inserts of the same rows. Plots: latency CDFs,
    /// achieved vs offered rate, latency by rate.
    ImSend(im_send::Args),
    /// Offline catch-up through `rim standalone`: a user offline while
    /// messages pile up over many conversations reconnects and SYNCs;
    /// round trips and time. Plot: each SYNC's round trip by page.
    ImCatchup(im_catchup::Args),
    /// History pages of a big conversation (written by raw inserts with
    /// rim's schema before rim starts): p50/p99 per PULL, newest pages and
    /// random depths. Plot: page latency CDF.
    ImHistory(im_history::Args),
    /// The IM store alone, no sockets: messages/s, inbox rows/s, commits,
    /// send latency, and per message the bytes of each table, WAL and
    /// PostgreSQL CPU, for 1:1, groups and big groups, on one PostgreSQL
    /// primary or sharded over several.
    ImStore(im_store::Args),
    /// Room routing (issue #15, part 3): job and comet CPU per room
    /// message with the job sending a room's batches only to the comets
    /// hosting it, then to every comet; K comets, one logic and one job
    /// per phase as processes, through a Kafka-protocol broker. Plot: bars
    /// per phase.
    RoomRoutes(room_routes::Args),
    /// The raw tokio fan-out server `fanout` compares rim with.
    Baseline(baseline::Args),
    /// A load-generator child process driven over stdin (used by the other
    /// subcommands).
    #[command(hide = true)]
    ClientProc(clientproc::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("rim-bench: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::PushLatency(args) => push_latency::run(args).await,
            Command::Connections(args) => connections::run(args).await,
            Command::Fanout(args) => fanout::run(args).await,
            Command::RoomRoutes(args) => room_routes::run(args).await,
            Command::Baseline(args) => baseline::run(args).await,
            Command::ImSend(args) => im_send::run(args).await,
            Command::ImCatchup(args) => im_catchup::run(args).await,
            Command::ImHistory(args) => im_history::run(args).await,
            Command::ImStore(args) => im_store::run(args).await,
            Command::ClientProc(args) => clientproc::run(args).await,
        }
    });
    // Client tasks still parked on sockets must not delay the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("rim-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// The shared options keep their flags, defaults and top-level JSON keys
    /// (results files record the arguments they were produced with).
    #[test]
    fn shared_options_keep_their_flags_defaults_and_json_keys() {
        let cli = Cli::try_parse_from([
            "rim-bench",
            "connections",
            "--rim",
            "/bin/rim",
            "--transport",
            "ws",
            "--per-process",
            "100",
            "--json",
            "out.json",
        ])
        .unwrap();
        let Command::Connections(args) = cli.command else {
            panic!("parsed {:?}", cli.command)
        };
        let json = serde_json::to_value(&args).unwrap();
        assert_eq!(json["rim"], "/bin/rim");
        assert_eq!(json["transport"], "ws");
        assert_eq!(json["heartbeat"], 30);
        assert_eq!(json["per_process"], 100);
        assert_eq!(json["source_addrs"], 16);
        assert_eq!(json["port_base"], 31_000);
        assert_eq!(json["json"], "out.json");
        assert_eq!(json["svg"], serde_json::Value::Null);

        let cli = Cli::try_parse_from(["rim-bench", "fanout"]).unwrap();
        let Command::Fanout(args) = cli.command else {
            panic!("parsed {:?}", cli.command)
        };
        let json = serde_json::to_value(&args).unwrap();
        assert_eq!(json["rim"], "target/release/rim");
        assert_eq!(json["per_process"], 15_000);
        assert_eq!(json["port_base"], 30_000);
        assert_eq!(json["log_dir"], serde_json::Value::Null);

        let cli = Cli::try_parse_from(["rim-bench", "push-latency", "--heartbeat", "5"]).unwrap();
        let Command::PushLatency(args) = cli.command else {
            panic!("parsed {:?}", cli.command)
        };
        let json = serde_json::to_value(&args).unwrap();
        assert_eq!(
            (json["transport"].as_str(), json["heartbeat"].as_u64()),
            (Some("tcp"), Some(5))
        );
        assert_eq!(json["source_addrs"], 8);
    }

    /// The IM subcommands keep their flags, defaults and JSON keys.
    #[test]
    fn im_subcommands_keep_their_flags_and_defaults() {
        let cli = Cli::try_parse_from(["rim-bench", "im-send", "--rates", "500,4000"]).unwrap();
        let Command::ImSend(args) = cli.command else {
            panic!("parsed {:?}", cli.command)
        };
        let json = serde_json::to_value(&args).unwrap();
        assert_eq!(json["rim"], "target/release/rim");
        assert_eq!(json["port_base"], 32_000);
        assert_eq!(json["rates"], serde_json::json!([500.0, 4000.0]));
        assert_eq!(json["pairs"], 200);
        assert_eq!(
            (json["duration"].as_u64(), json["warmup"].as_u64()),
            (Some(15), Some(3))
        );
        assert_eq!(json["raw_batch"], serde_json::json!([256, 1]));
        assert_eq!(json["raw_messages"], 200_000);
        // No abuser by default; the standalone's limits far above a pair's share.
        assert_eq!(json["abuser_rate"], 0.0);
        assert_eq!(
            (
                json["send_rate_per_conn"].as_u64(),
                json["send_rate_per_user"].as_u64()
            ),
            (Some(1000), Some(1000))
        );
        let cli = Cli::try_parse_from([
            "rim-bench",
            "im-send",
            "--abuser-rate",
            "200",
            "--send-rate-per-conn",
            "20",
            "--send-rate-per-user",
            "50",
        ])
        .unwrap();
        let Command::ImSend(abuse) = cli.command else {
            panic!("parsed {:?}", cli.command)
        };
        assert_eq!(
            (
                abuse.abuser_rate,
                abuse.send_rate_per_conn,
                abuse.send_rate_per_user
            ),
            (200.0, 20, 50)
        );
        assert!(Cli::try_parse_from(["rim-bench", "im-send", "--abuser-rate", "-1"]).is_err());
        // The standalone's limits mean nothing against a cluster.
        assert!(
            Cli::try_parse_from([
                "rim-bench",
                "im-send",
                "--comets",
                "127.0.0.1:1",
                "--send-rate-per-conn",
                "5"
            ])
            .is_err()
        );
        assert!(Cli::try_parse_from(["rim-bench", "im-send", "--rates", "0"]).is_err());
        assert!(Cli::try_parse_from(["rim-bench", "im-send", "--pairs", "0"]).is_err());
        assert!(Cli::try_parse_from(["rim-bench", "im-send", "--body-bytes", "10"]).is_err());
        // Standalone by default: no cluster flags.
        assert_eq!(json["comets"], serde_json::json!([]));
        assert_eq!(json["api"], serde_json::json!([]));
        assert_eq!(json["job_metrics"], serde_json::json!([]));
        assert_eq!(json["proc"], serde_json::Value::Null);
        assert_eq!(json["procs"], serde_json::json!([]));

        // Against a cluster: comets, logics' APIs, jobs' metrics, and
        // watched processes.
        let cli = Cli::try_parse_from([
            "rim-bench",
            "im-send",
            "--comets",
            "127.0.0.1:23121,127.0.0.1:23221",
            "--api",
            "http://127.0.0.1:23111,http://127.0.0.1:23211",
            "--job-metrics",
            "http://127.0.0.1:23148/metrics",
            "--proc",
            "comet-a1=10",
            "--proc",
            "postgres=11",
        ])
        .unwrap();
        let Command::ImSend(args) = cli.command else {
            panic!("parsed {:?}", cli.command)
        };
        let json = serde_json::to_value(&args).unwrap();
        assert_eq!(
            json["comets"],
            serde_json::json!(["127.0.0.1:23121", "127.0.0.1:23221"])
        );
        assert_eq!(
            json["api"],
            serde_json::json!(["http://127.0.0.1:23111", "http://127.0.0.1:23211"])
        );
        assert_eq!(
            json["job_metrics"],
            serde_json::json!(["http://127.0.0.1:23148/metrics"])
        );
        assert_eq!(
            json["procs"],
            serde_json::json!([{"name": "comet-a1", "pid": 10}, {"name": "postgres", "pid": 11}])
        );
        // --api and --job-metrics only make sense with --comets; bad
        // addresses and NAME=PID are refused.
        assert!(
            Cli::try_parse_from(["rim-bench", "im-send", "--api", "http://127.0.0.1:1"]).is_err()
        );
        assert!(
            Cli::try_parse_from([
                "rim-bench",
                "im-send",
                "--job-metrics",
                "http://127.0.0.1:1"
            ])
            .is_err()
        );
        assert!(Cli::try_parse_from(["rim-bench", "im-send", "--comets", "nowhere"]).is_err());
        assert!(Cli::try_parse_from(["rim-bench", "im-send", "--proc", "comet"]).is_err());

        let cli = Cli::try_parse_from(["rim-bench", "im-catchup"]).unwrap();
        let Command::ImCatchup(args) = cli.command else {
            panic!("parsed {:?}", cli.command)
        };
        let json = serde_json::to_value(&args).unwrap();
        assert_eq!(
            (json["messages"].as_u64(), json["convs"].as_u64()),
            (Some(10_000), Some(50))
        );
        assert_eq!(json["limit"], 200);
        assert!(Cli::try_parse_from(["rim-bench", "im-catchup", "--limit", "201"]).is_err());

        let cli = Cli::try_parse_from(["rim-bench", "im-history", "--json", "h.json"]).unwrap();
        let Command::ImHistory(args) = cli.command else {
            panic!("parsed {:?}", cli.command)
        };
        let json = serde_json::to_value(&args).unwrap();
        assert_eq!(json["messages"], 1_000_000);
        assert_eq!(
            (json["limit"].as_u64(), json["pages"].as_u64()),
            (Some(50), Some(2_000))
        );
        assert_eq!(json["json"], "h.json");
        assert!(Cli::try_parse_from(["rim-bench", "im-history", "--limit", "101"]).is_err());
    }

    /// `im-store` needs a URL, defaults to the four scenarios, and takes
    /// several primaries, scenarios and postmaster PIDs.
    #[test]
    fn im_store_keeps_its_flags_and_defaults() {
        assert!(Cli::try_parse_from(["rim-bench", "im-store"]).is_err());
        let url = "postgres://postgres@127.0.0.1:15800/postgres";
        let cli = Cli::try_parse_from(["rim-bench", "im-store", "--postgres", url]).unwrap();
        let Command::ImStore(args) = cli.command else {
            panic!("parsed {:?}", cli.command)
        };
        let json = serde_json::to_value(&args).unwrap();
        assert_eq!(json["postgres"], serde_json::json!([url]));
        assert_eq!(
            json["scenarios"],
            serde_json::json!(["one-to-one", "group:20", "group:200", "big:10000"])
        );
        assert_eq!(
            (json["senders"].as_u64(), json["seconds"].as_u64()),
            (Some(32), Some(20))
        );
        assert_eq!(
            (
                json["users"].as_u64(),
                json["groups"].as_u64(),
                json["big_groups"].as_u64()
            ),
            (Some(20_000), Some(200), Some(16))
        );
        assert_eq!(json["pool_size"], 8);
        assert_eq!(json["pg_pids"], serde_json::json!([]));
        assert_eq!(json["keep"], false);
        let cli = Cli::try_parse_from([
            "rim-bench",
            "im-store",
            "--postgres",
            url,
            "--postgres",
            url,
            "--scenario",
            "group:20",
            "--scenario",
            "one-to-one",
            "--pg-pid",
            "7",
            "--pg-pid",
            "8",
            "--senders",
            "64",
            "--seconds",
            "1",
            "--keep",
            "--json",
            "s.json",
        ])
        .unwrap();
        let Command::ImStore(args) = cli.command else {
            panic!("parsed {:?}", cli.command)
        };
        assert_eq!(args.postgres.len(), 2);
        assert_eq!(
            args.scenarios,
            [im_store::Scenario::Group(20), im_store::Scenario::OneToOne]
        );
        assert_eq!(
            (args.pg_pids, args.senders, args.seconds, args.keep),
            (vec![7, 8], 64, 1, true)
        );
        for bad in [
            ["--scenario", "group:1"],
            ["--senders", "0"],
            ["--seconds", "0"],
            ["--seconds", "601"],
            ["--pg-pid", "x"],
        ] {
            let mut argv = vec!["rim-bench", "im-store", "--postgres", url];
            argv.extend(bad);
            assert!(Cli::try_parse_from(&argv).is_err(), "{bad:?} accepted");
        }
    }
}
