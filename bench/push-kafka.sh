#!/usr/bin/env bash
# The "through Kafka" push benchmark of docs/benchmarks.md (Setup 2): one
# comet, one logic, one job, a fresh tansu broker, Redis and ZooKeeper, all
# throwaway on loopback ports 27xxx–29xxx, then `rim-bench push-latency`
# against them, then everything stopped by PID.
#
#   bench/push-kafka.sh [rim-bench push-latency args...]
#
# e.g. bench/push-kafka.sh --clients 1000 --mode unicast --rate 3000 \
#          --duration 20 --warmup 3 --json out.json
#
# The --api, --comet and --proc arguments are added here. RIM_BIN,
# RIM_BENCH_BIN and RIM_CONFIG_DIR (default deploy/config) choose the
# binaries and role configs (e.g. an older build with its own configs).
# rim settings go
# in as environment variables (RIM_QUEUE__FETCH_WAIT=10ms ...): every
# process inherits them. BENCH_PERF=DIR also records a perf profile of each
# rim process over the measured window (DIR/<role>.perf.data).
# Builds nothing: run `cargo build --release -p rim -p rim-bench` first.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RIM="${RIM_BIN:-$ROOT/target/release/rim}"
BENCH="${RIM_BENCH_BIN:-$ROOT/target/release/rim-bench}"
ZK_SERVER=/usr/share/zookeeper/bin/zkServer.sh
CONFIG="${RIM_CONFIG_DIR:-$ROOT/deploy/config}"
W="$(mktemp -d /tmp/rim-push-kafka.XXXXXX)"
mkdir -p "$W/redis" "$W/zk/data"
PIDS=()

stop_all() {
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill "${PIDS[i]}" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    if [[ -f $W/zk/zoo.cfg ]]; then
        ZOO_LOG_DIR=$W/zk "$ZK_SERVER" stop "$W/zk/zoo.cfg" >/dev/null 2>&1 || true
    fi
    if [[ -f $W/redis/redis.pid ]]; then
        local redis
        redis=$(cat "$W/redis/redis.pid")
        kill "$redis" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$redis" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -rf "$W"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

wait_port() {
    for _ in $(seq 300); do
        (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "port $1 did not open; logs:" >&2
    tail -n 20 "$W"/*.log >&2
    return 1
}

redis-server --port 27379 --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --pidfile "$W/redis/redis.pid" --dir "$W/redis" --logfile "$W/redis/redis.log"
printf 'tickTime=500\ninitLimit=10\nsyncLimit=5\ndataDir=%s/zk/data\nclientPort=27181\nclientPortAddress=127.0.0.1\nmaxSessionTimeout=60000\nadmin.enableServer=false\n4lw.commands.whitelist=ruok,srvr\n' \
    "$W" >"$W/zk/zoo.cfg"
ZOO_LOG_DIR=$W/zk JMXDISABLE=true SERVER_JVMFLAGS=-Xmx256m "$ZK_SERVER" start "$W/zk/zoo.cfg" >/dev/null
wait_port 27379
wait_port 27181
for _ in $(seq 50); do [[ -s $W/redis/redis.pid ]] && break; sleep 0.1; done

tansu broker --listener-url tcp://127.0.0.1:29192 --advertised-listener-url tcp://127.0.0.1:29192 \
    --storage-engine memory://tansu/ >"$W/tansu.log" 2>&1 &
TANSU=$!
PIDS+=("$TANSU")
wait_port 29192
tansu topic create rim-push --broker tcp://127.0.0.1:29192 --partitions 4 >/dev/null

export RIM_DISCOVERY__ZOOKEEPER=127.0.0.1:27181 RIM_DISCOVERY__ROOT=/rim-bench \
    RIM_QUEUE__BROKERS=127.0.0.1:29192 RUST_LOG="${RUST_LOG:-warn}"
RIM_NODE__ID=bench-comet RIM_COMET__TCP_BIND=127.0.0.1:23201 RIM_COMET__WS_BIND=127.0.0.1:23202 \
    RIM_COMET__WSS_BIND=127.0.0.1:23203 RIM_COMET__GRPC_BIND=127.0.0.1:23209 \
    RIM_METRICS__BIND=127.0.0.1:23208 \
    "$RIM" comet --config "$CONFIG/comet.toml" >"$W/comet.log" 2>&1 &
COMET=$!
PIDS+=("$COMET")
RIM_NODE__ID=bench-logic RIM_LOGIC__AUTH__POLICY=none RIM_ROUTER__REDIS=redis://127.0.0.1:27379 \
    RIM_LOGIC__GRPC_BIND=127.0.0.1:23119 RIM_API__HTTP_BIND=127.0.0.1:23112 \
    "$RIM" logic --config "$CONFIG/logic.toml" >"$W/logic.log" 2>&1 &
LOGIC=$!
PIDS+=("$LOGIC")
RIM_NODE__ID=bench-job RIM_METRICS__BIND=127.0.0.1:23148 \
    "$RIM" job --config "$CONFIG/job.toml" >"$W/job.log" 2>&1 &
JOB=$!
PIDS+=("$JOB")
wait_port 23201
wait_port 23112
sleep 8

if [[ -n ${BENCH_PERF:-} ]]; then
    mkdir -p "$BENCH_PERF"
    # After the bench's warmup (default 3 s), for most of the window.
    (
        sleep "${BENCH_PERF_DELAY:-5}"
        for role in logic job comet; do
            pid_var=${role^^}
            perf record -F 999 -g --call-graph dwarf,16384 -o "$BENCH_PERF/$role.perf.data" \
                -p "${!pid_var}" -- sleep "${BENCH_PERF_SECS:-10}" >/dev/null 2>&1 &
        done
        wait
    ) &
    PERF=$!
fi

"$BENCH" push-latency --api http://127.0.0.1:23112 --comet 127.0.0.1:23201 \
    --proc logic="$LOGIC" --proc comet="$COMET" --proc job="$JOB" --proc tansu="$TANSU" \
    --proc redis="$(cat "$W/redis/redis.pid")" "$@"
if [[ -n ${PERF:-} ]]; then wait "$PERF"; fi
