#!/usr/bin/env bash
# A two-region rim cluster on loopback, for trying rim out and for tests.
#
#   deploy/local-cluster.sh start    start everything, wait until ready, print a summary
#   deploy/local-cluster.sh status   show which recorded processes are alive
#   deploy/local-cluster.sh stop     stop everything it started (by PID) and remove its state
#
# `start` runs, on 127.0.0.1 and on its own ports (below), a throwaway Redis,
# ZooKeeper (Debian's zkServer.sh), the Kafka-protocol broker tansu with the
# topic rim-push, PostgreSQL (Debian's postgresql: the IM message store,
# initdb'd into the state dir) and rim processes for two regions:
#
#   region a: logic-a (gRPC + HTTP API), comet-a1, comet-a2, job-a
#   region b: logic-b (gRPC + HTTP API), comet-b1, comet-b2, job-b
#
# Both logics share Redis (one online map), Kafka and PostgreSQL (one message
# store, im.node 1 and 2); every job group
# (rim-job-a, rim-job-b) consumes every message and delivers to its own
# region's comets. Node selection (/goim/nodes/weighted) maps client
# addresses 127.2.0.0/16 to region b and the rest of 127.0.0.0/8 to region a,
# or takes ?region=.
#
# It builds nothing: it runs target/release/rim (or $RIM_BIN); build it with
# `cargo build --release`. Redis, ZooKeeper and tansu must be installed, as
# deploy/test.sh installs them (apt-get install redis-server zookeeperd;
# cargo install tansu --version 0.6.0 --locked --features dynostore,libsql;
# apt-get install postgresql). As root, PostgreSQL runs as the postgres user.
#
# Processes, their PIDs and logs live in a state dir: $RIM_CLUSTER_DIR when
# set, else a fresh temp dir whose path is recorded in
# ${TMPDIR:-/tmp}/rim-local-cluster.dir. `stop` signals only the PIDs
# recorded there (SIGTERM, then SIGKILL after 20 s), checking each PID's start
# time so a reused PID is never signalled, and is safe to call twice.
#
# Environment:
#   RIM_BIN                the rim binary (default target/release/rim)
#   RIM_CLUSTER_DIR        state dir, new or empty (default: a temp dir, see
#                          above); `stop` removes it
#   RIM_CLUSTER_PORT_BASE  first port (default 23000); the cluster uses
#                          BASE+1..4 for Redis, ZooKeeper, Kafka and
#                          PostgreSQL and
#                          BASE+100..199 (region a), BASE+200..299 (region b)
#   RIM_CLUSTER_ADMIN_TOKEN  bearer token of the admin endpoints (default local-admin)
#   RIM_CLUSTER_PUSH_TOKEN   bearer token of the push endpoints (default local-push)
#   RIM_CLUSTER_GRPC_TOKEN   the cluster's internal gRPC token (default local-grpc)
#                          Everything binds 127.0.0.1, where rim does not
#                          require tokens; they are set anyway, as in a real
#                          cluster (RIM_API__ADMIN_TOKEN, RIM_API__PUSH_TOKEN,
#                          RIM_NODE__GRPC_TOKEN on every process).
#   RIM_CLUSTER_KEEP_ON_FAILURE=1  leave what started when `start` fails
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly BASE="${RIM_CLUSTER_PORT_BASE:-23000}"
readonly REDIS_PORT=$((BASE + 1))
readonly ZK_PORT=$((BASE + 2))
readonly KAFKA_PORT=$((BASE + 3))
readonly PG_PORT=$((BASE + 4))
readonly TOPIC="rim-push"
readonly TOPIC_PARTITIONS=4
readonly ADMIN_TOKEN="${RIM_CLUSTER_ADMIN_TOKEN:-local-admin}"
readonly PUSH_TOKEN="${RIM_CLUSTER_PUSH_TOKEN:-local-push}"
readonly GRPC_TOKEN="${RIM_CLUSTER_GRPC_TOKEN:-local-grpc}"
readonly ZK_SERVER="${RIM_CLUSTER_ZK_SERVER:-/usr/share/zookeeper/bin/zkServer.sh}"
readonly POINTER="${TMPDIR:-/tmp}/rim-local-cluster.dir"
readonly READY_SECONDS=60
readonly STOP_SECONDS=20

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

STATE="" # the state dir of the cluster being started or stopped
METRICS=0 # 1 when this rim binary knows the [metrics] section

log() { echo "==> $*" >&2; }

die() {
    echo "error: $*" >&2
    exit 1
}

usage() {
    sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# Port layout of a region: logic HTTP +11, logic gRPC +19; comet N (1, 2)
# client TCP +N1, WebSocket +N2, metrics +N8, gRPC +N9; job metrics +48.
region_base() {
    case "$1" in
    a) echo $((BASE + 100)) ;;
    b) echo $((BASE + 200)) ;;
    *) die "unknown region $1" ;;
    esac
}

# ------------------------------------------------------------- helpers

tcp_open() {
    # shellcheck disable=SC2016 # $1 expands in the inner shell
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# True when something listens on TCP port $1. Asks the kernel (ss) rather
# than connecting: a comet counts a connection that hangs up before Auth as a
# bad frame.
listening() {
    if command -v ss >/dev/null; then
        [[ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]]
    else
        tcp_open "$1"
    fi
}

http_ok() {
    curl -fsS -m 2 -o /dev/null "$1" 2>/dev/null
}

# Start time of a process in clock ticks since boot (field 22 of
# /proc/PID/stat), or nothing when it does not exist.
start_time() {
    local stat fields
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
    # The command name (field 2) may hold spaces; fields after ") " are fixed.
    stat="${stat##*) }"
    read -r -a fields <<<"$stat"
    echo "${fields[19]}"
}

# True when PID is alive and is the process recorded with START.
same_process() {
    local pid="$1" start="$2"
    [[ -n "$pid" && -n "$start" ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [[ "$(start_time "$pid")" == "$start" ]]
}

# record NAME ROLE REGION PID PORTS LOG: appends a process to the state.
record() {
    local start
    start="$(start_time "$4")"
    [[ -n "$start" ]] || {
        show_log "$6"
        die "$1 (pid $4) exited right after starting"
    }
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$start" "$5" "$6" >>"$STATE/procs.tsv"
}

show_log() {
    local file="$1"
    if [[ -s "$file" ]]; then
        echo "---- last lines of $file ----" >&2
        tail -n 30 "$file" >&2
        echo "----" >&2
    else
        echo "(no output in $file)" >&2
    fi
}

# wait_for WHAT LOG CMD...: retries CMD every 0.5 s for READY_SECONDS.
wait_for() {
    local what="$1" logfile="$2" i
    shift 2
    for ((i = 0; i < READY_SECONDS * 2; i++)); do
        if "$@"; then
            return 0
        fi
        all_alive
        sleep 0.5
    done
    echo "error: $what not ready within $READY_SECONDS s" >&2
    show_log "$logfile"
    return 1
}

# Fails, with its log, when a process recorded so far has exited.
all_alive() {
    local name role region pid start ports logfile
    while IFS=$'\t' read -r name role region pid start ports logfile; do
        if ! same_process "$pid" "$start"; then
            show_log "$logfile"
            die "$name (pid $pid) exited"
        fi
    done <"$STATE/procs.tsv"
}

# The state dir of a running (or stale) cluster, or nothing.
existing_state() {
    if [[ -n "${RIM_CLUSTER_DIR:-}" ]]; then
        [[ -f "$RIM_CLUSTER_DIR/procs.tsv" ]] && echo "$RIM_CLUSTER_DIR"
        return 0
    fi
    if [[ -s "$POINTER" ]]; then
        local dir
        dir="$(cat "$POINTER")"
        [[ -d "$dir" ]] && echo "$dir"
    fi
    return 0
}

# Number of recorded processes still alive in state dir $1.
alive_count() {
    local n=0 name role region pid start ports logfile
    [[ -f "$1/procs.tsv" ]] || {
        echo 0
        return 0
    }
    while IFS=$'\t' read -r name role region pid start ports logfile; do
        if same_process "$pid" "$start"; then
            n=$((n + 1))
        fi
    done <"$1/procs.tsv"
    echo "$n"
}

# ------------------------------------------------------------- services

start_redis() {
    mkdir -p "$STATE/redis"
    log "starting Redis on 127.0.0.1:$REDIS_PORT"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --daemonize yes --pidfile "$STATE/redis/redis.pid" --dir "$STATE/redis" \
        --logfile "$STATE/redis/redis.log" </dev/null >/dev/null
    wait_for Redis "$STATE/redis/redis.log" redis_ready
    record redis service - "$(cat "$STATE/redis/redis.pid")" "$REDIS_PORT" "$STATE/redis/redis.log"
}

redis_ready() {
    [[ -s "$STATE/redis/redis.pid" ]] &&
        [[ "$(timeout 2 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]
}

start_zookeeper() {
    mkdir -p "$STATE/zk/data"
    cat >"$STATE/zk/zoo.cfg" <<EOF
tickTime=500
initLimit=10
syncLimit=5
dataDir=$STATE/zk/data
clientPort=$ZK_PORT
clientPortAddress=127.0.0.1
maxSessionTimeout=60000
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr
EOF
    log "starting ZooKeeper on 127.0.0.1:$ZK_PORT"
    # Debian's zkEnv.sh sends the server's stdout to /var/log/zookeeper
    # whatever ZOO_LOG_DIR says; zkServer.log has the start script's output.
    ZOO_LOG_DIR="$STATE/zk" JMXDISABLE=true SERVER_JVMFLAGS="-Xmx256m" \
        "$ZK_SERVER" start "$STATE/zk/zoo.cfg" </dev/null >"$STATE/zk/zkServer.log" 2>&1 || {
        show_log "$STATE/zk/zkServer.log"
        die "zkServer.sh start failed"
    }
    wait_for ZooKeeper "$STATE/zk/zkServer.log" zk_ready
    record zookeeper service - "$(cat "$STATE/zk/data/zookeeper_server.pid")" "$ZK_PORT" \
        "$STATE/zk/zkServer.log"
}

# shellcheck disable=SC2016 # $1 expands in the inner shell
zk_ready() {
    [[ -s "$STATE/zk/data/zookeeper_server.pid" ]] &&
        [[ "$(timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && printf srvr >&3 && cat <&3' _ "$ZK_PORT" 2>/dev/null)" == *"Mode: "* ]]
}

start_tansu() {
    local url="tcp://127.0.0.1:$KAFKA_PORT" pid
    log "starting tansu on 127.0.0.1:$KAFKA_PORT"
    setsid tansu broker --listener-url "$url" --advertised-listener-url "$url" \
        --storage-engine memory://tansu/ </dev/null >"$STATE/tansu.log" 2>&1 &
    pid=$!
    record tansu service - "$pid" "$KAFKA_PORT" "$STATE/tansu.log"
    wait_for tansu "$STATE/tansu.log" tcp_open "$KAFKA_PORT"
    log "creating topic $TOPIC ($TOPIC_PARTITIONS partitions)"
    timeout 30 tansu topic create "$TOPIC" --partitions "$TOPIC_PARTITIONS" --broker "$url" \
        </dev/null >"$STATE/tansu-topic.log" 2>&1 || {
        show_log "$STATE/tansu-topic.log"
        die "creating topic $TOPIC on tansu failed"
    }
}

# Debian's newest installed PostgreSQL server binaries (initdb, pg_ctl).
pg_bindir() {
    local dir
    dir="$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)"
    [[ -x "$dir/initdb" ]] || die "PostgreSQL server binaries not found under /usr/lib/postgresql (apt-get install postgresql)"
    echo "$dir"
}

# as_pg CMD...: runs a PostgreSQL tool as the cluster's owner (initdb refuses root).
as_pg() {
    if ((EUID == 0)); then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

start_postgres() {
    local bin dir="$STATE/pg"
    bin="$(pg_bindir)"
    mkdir -p "$dir"
    if ((EUID == 0)); then
        chmod 711 "$STATE"
        chown postgres: "$dir"
    fi
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
    as_pg "$bin/initdb" -D "$dir/data" -U rim --auth=trust </dev/null >"$dir/initdb.log" 2>&1 || {
        show_log "$dir/initdb.log"
        die "initdb failed"
    }
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 30 \
        -o "-p $PG_PORT -k $dir -c listen_addresses=127.0.0.1" start \
        </dev/null >"$dir/pg_ctl.log" 2>&1 || {
        show_log "$dir/postgres.log"
        die "PostgreSQL did not start"
    }
    record postgres service - "$(head -n 1 "$dir/data/postmaster.pid")" "$PG_PORT" "$dir/postgres.log"
    as_pg "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U rim rim </dev/null >"$dir/createdb.log" 2>&1 || {
        show_log "$dir/createdb.log"
        die "createdb rim failed"
    }
}

# ------------------------------------------------------------- rim

# run_rim NAME ROLE REGION PORTS CONFIG VAR=VALUE...: starts one rim process
# with a config file and environment overrides. The caller's own
# RIM_<SECTION>__<KEY> variables are not passed on: the cluster is its own.
run_rim() {
    local name="$1" role="$2" region="$3" ports="$4" config="$5" pid var
    shift 5
    local logfile="$STATE/$name.log" unset=()
    while IFS= read -r var; do
        unset+=(-u "$var")
    done < <(compgen -e | grep -E '^RIM_[A-Z0-9_]+__' || true)
    setsid env "${unset[@]}" \
        RUST_LOG="${RUST_LOG:-info}" \
        RIM_NODE__ID="$name" RIM_NODE__REGION="$region" \
        RIM_DISCOVERY__BACKEND=zookeeper RIM_DISCOVERY__ZOOKEEPER="127.0.0.1:$ZK_PORT" \
        RIM_DISCOVERY__ROOT=/rim \
        RIM_NODE__GRPC_TOKEN="$GRPC_TOKEN" \
        "$@" \
        "$RIM_BIN" "$role" --config "$config" \
        </dev/null >"$logfile" 2>&1 &
    pid=$!
    record "$name" "$role" "$region" "$pid" "$ports" "$logfile"
}

start_logic() {
    local region="$1" b
    b="$(region_base "$region")"
    local http=$((b + 11)) grpc=$((b + 19))
    # The client network -> region table is an array of tables, which
    # environment variables cannot carry: the logics read the shipped
    # logic.toml plus this table.
    if [[ ! -f "$STATE/logic.toml" ]]; then
        cat "$ROOT/deploy/config/logic.toml" - >"$STATE/logic.toml" <<'EOF'

# Added by deploy/local-cluster.sh: clients from 127.2.0.0/16 are in region
# b, every other loopback client in region a (the longest prefix wins).
[[logic.nodes.regions]]
cidr = "127.0.0.0/8"
region = "a"

[[logic.nodes.regions]]
cidr = "127.2.0.0/16"
region = "b"
EOF
    fi
    run_rim "logic-$region" logic "$region" "http $http, grpc $grpc" "$STATE/logic.toml" \
        RIM_LOGIC__GRPC_BIND="127.0.0.1:$grpc" \
        RIM_API__HTTP_BIND="127.0.0.1:$http" \
        RIM_API__ADMIN_TOKEN="$ADMIN_TOKEN" \
        RIM_API__PUSH_TOKEN="$PUSH_TOKEN" \
        RIM_LOGIC__AUTH__POLICY=none \
        RIM_ROUTER__REDIS="redis://127.0.0.1:$REDIS_PORT" \
        RIM_QUEUE__BROKERS="127.0.0.1:$KAFKA_PORT" \
        RIM_QUEUE__TOPIC="$TOPIC" \
        RIM_IM__STORE=postgres \
        RIM_IM__POSTGRES="postgres://rim@127.0.0.1:$PG_PORT/rim" \
        RIM_IM__NODE="$([[ "$region" == a ]] && echo 1 || echo 2)"
}

start_comet() {
    local region="$1" n="$2" b
    b="$(region_base "$region")"
    local tcp=$((b + n * 10 + 11)) ws=$((b + n * 10 + 12)) metrics=$((b + n * 10 + 18)) grpc=$((b + n * 10 + 19))
    local extra=() ports="tcp $tcp, ws $ws, grpc $grpc"
    if ((METRICS)); then
        extra+=(RIM_METRICS__BIND="127.0.0.1:$metrics")
        ports+=", metrics $metrics"
    fi
    run_rim "comet-$region$n" comet "$region" "$ports" "$ROOT/deploy/config/comet.toml" \
        RIM_COMET__TCP_BIND="127.0.0.1:$tcp" \
        RIM_COMET__WS_BIND="127.0.0.1:$ws" \
        RIM_COMET__GRPC_BIND="127.0.0.1:$grpc" \
        RIM_COMET__DRAIN_WINDOW=1s \
        RIM_COMET__ROOM_REPORT_INTERVAL=2s \
        "${extra[@]}"
}

start_job() {
    local region="$1" b
    b="$(region_base "$region")"
    local metrics=$((b + 48)) extra=() ports="-"
    if ((METRICS)); then
        extra+=(RIM_METRICS__BIND="127.0.0.1:$metrics")
        ports="metrics $metrics"
    fi
    # tansu holds a static member's JoinGroup and SyncGroup for 3 s each:
    # dynamic members with a session under its 3 s follower pause get a
    # restarted job delivering again soonest (docs/operations.md, "Job restart").
    run_rim "job-$region" job "$region" "$ports" "$ROOT/deploy/config/job.toml" \
        RIM_JOB__GROUP="rim-job-$region" \
        RIM_QUEUE__BROKERS="127.0.0.1:$KAFKA_PORT" \
        RIM_QUEUE__TOPIC="$TOPIC" \
        RIM_QUEUE__STATIC_MEMBERSHIP=false \
        RIM_QUEUE__SESSION_TIMEOUT=2s \
        RIM_QUEUE__HEARTBEAT_INTERVAL=500ms \
        "${extra[@]}"
}

logic_ready() {
    local http="$1"
    http_ok "http://127.0.0.1:$http/readyz"
}

comet_ready() {
    local region="$1" n="$2" b
    b="$(region_base "$region")"
    listening $((b + n * 10 + 11)) && listening $((b + n * 10 + 12)) && listening $((b + n * 10 + 19))
}

job_ready() {
    grep -q "partitions assigned" "$1"
}

# True when the logic at HTTP port $1 lists $2 comets.
comets_listed() {
    local count
    count="$(curl -fsS -m 2 "http://127.0.0.1:$1/goim/nodes/instances" 2>/dev/null |
        grep -o '"id":"comet-' | wc -l)" || return 1
    [[ "$count" -eq "$2" ]]
}

check_ports() {
    local port
    for port in "$REDIS_PORT" "$ZK_PORT" "$KAFKA_PORT" \
        $(for r in a b; do
            b="$(region_base "$r")"
            echo $((b + 11)) $((b + 19)) $((b + 21)) $((b + 22)) $((b + 29)) $((b + 31)) $((b + 32)) $((b + 39))
            ((METRICS)) && echo $((b + 28)) $((b + 38)) $((b + 48))
        done); do
        if listening "$port"; then
            die "port $port is already in use on 127.0.0.1 (set RIM_CLUSTER_PORT_BASE to move the cluster)"
        fi
    done
}

require_tools() {
    [[ -x "$RIM_BIN" ]] || die "no rim binary at $RIM_BIN: build it with 'cargo build --release' (or set RIM_BIN)"
    local tool
    for tool in redis-server redis-cli tansu curl setsid; do
        command -v "$tool" >/dev/null ||
            die "$tool is not installed (deploy/test.sh installs redis-server, zookeeperd and tansu)"
    done
    [[ -x "$ZK_SERVER" ]] || die "$ZK_SERVER not found: apt-get install zookeeperd"
}

# ------------------------------------------------------------- commands

cmd_start() {
    require_tools
    local previous
    previous="$(existing_state)"
    if [[ -n "$previous" ]]; then
        if [[ "$(alive_count "$previous")" -gt 0 ]]; then
            die "the local cluster is already running (state in $previous); run '$0 stop' first"
        fi
        log "removing the state of a stopped cluster in $previous"
        STATE="$previous"
        stop_all
    fi
    if RIM_NODE__GRPC_TOKEN="$GRPC_TOKEN" "$RIM_BIN" comet --check 2>/dev/null | grep -q '^\[metrics\]'; then
        METRICS=1
    fi
    check_ports

    if [[ -n "${RIM_CLUSTER_DIR:-}" ]]; then
        # stop removes the state dir: never take over a directory with files.
        if [[ -e "$RIM_CLUSTER_DIR" ]] && [[ -n "$(ls -A "$RIM_CLUSTER_DIR")" ]]; then
            die "RIM_CLUSTER_DIR=$RIM_CLUSTER_DIR exists and is not empty; name a new or empty directory"
        fi
        STATE="$RIM_CLUSTER_DIR"
        mkdir -p "$STATE"
    else
        STATE="$(mktemp -d "${TMPDIR:-/tmp}/rim-local-cluster.XXXXXX")"
        echo "$STATE" >"$POINTER"
    fi
    : >"$STATE/procs.tsv"
    trap 'start_failed' EXIT
    trap 'exit 130' INT TERM

    start_redis
    start_zookeeper
    start_tansu
    start_postgres

    local r n b
    for r in a b; do
        start_logic "$r"
    done
    for r in a b; do
        b="$(region_base "$r")"
        wait_for "logic-$r" "$STATE/logic-$r.log" logic_ready $((b + 11))
        log "logic-$r is ready"
    done
    for r in a b; do
        for n in 1 2; do
            start_comet "$r" "$n"
        done
        start_job "$r"
    done
    for r in a b; do
        for n in 1 2; do
            wait_for "comet-$r$n" "$STATE/comet-$r$n.log" comet_ready "$r" "$n"
            log "comet-$r$n is ready"
        done
    done
    for r in a b; do
        wait_for "job-$r" "$STATE/job-$r.log" job_ready "$STATE/job-$r.log"
        log "job-$r is ready"
    done
    for r in a b; do
        b="$(region_base "$r")"
        wait_for "logic-$r to see the 4 comets" "$STATE/logic-$r.log" comets_listed $((b + 11)) 4
    done
    trap - EXIT
    summary
}

start_failed() {
    local rc=$?
    [[ "$rc" -ne 0 ]] || return 0
    if [[ "${RIM_CLUSTER_KEEP_ON_FAILURE:-}" == 1 ]]; then
        echo "start failed; RIM_CLUSTER_KEEP_ON_FAILURE=1: leaving what started (state in $STATE)" >&2
    else
        echo "start failed; stopping what started" >&2
        stop_all
    fi
    exit "$rc"
}

summary() {
    local a b
    a="$(region_base a)"
    b="$(region_base b)"
    echo
    echo "rim local cluster is running (state in $STATE)"
    echo
    print_table
    cat <<EOF

Push (either region's API; the push token is $PUSH_TOKEN, the admin token $ADMIN_TOKEN):
  curl -H 'Authorization: Bearer $PUSH_TOKEN' -X POST 'http://127.0.0.1:$((b + 11))/goim/push/room?operation=1000&type=live&room=1000' -d 'hello'
  curl -H 'Authorization: Bearer $PUSH_TOKEN' -X POST 'http://127.0.0.1:$((a + 11))/goim/push/mids?operation=1000&mids=42' -d 'hello'
  curl 'http://127.0.0.1:$((a + 11))/goim/nodes/instances'
  curl 'http://127.0.0.1:$((a + 11))/goim/nodes/weighted?platform=web'                 # region a (127.0.0.1)
  curl --interface 127.2.0.1 'http://127.0.0.1:$((a + 11))/goim/nodes/weighted?platform=web'  # region b by CIDR
  curl 'http://127.0.0.1:$((a + 11))/goim/nodes/weighted?platform=web&region=b'
  curl -H 'Authorization: Bearer $ADMIN_TOKEN' 'http://127.0.0.1:$((a + 11))/admin/comets'

Connect a client (auth policy none: the token is goim's JSON):
  TCP 127.0.0.1:$((a + 21)) (comet-a1), WebSocket ws://127.0.0.1:$((b + 22))/sub (comet-b1)
  auth body: {"mid":42,"key":"","room_id":"live://1000","platform":"web","accepts":[1000]}
  chat (IM): add 21 and 27 to accepts, send ops 18-26 (../shared/docs/im.md);
  messages are stored in postgres://rim@127.0.0.1:$PG_PORT/rim

Stop: $0 stop
EOF
}

print_table() {
    local name role region pid start ports logfile state
    printf '%-10s %-8s %-6s %-8s %-6s %-48s %s\n' NAME ROLE REGION PID STATE PORTS LOG
    while IFS=$'\t' read -r name role region pid start ports logfile; do
        if same_process "$pid" "$start"; then state=alive; else state=dead; fi
        printf '%-10s %-8s %-6s %-8s %-6s %-48s %s\n' "$name" "$role" "$region" "$pid" "$state" "$ports" "$logfile"
    done <"$STATE/procs.tsv"
}

cmd_status() {
    STATE="$(existing_state)"
    if [[ -z "$STATE" ]]; then
        echo "no local cluster is running"
        return 3
    fi
    echo "state in $STATE"
    print_table
    local alive total
    alive="$(alive_count "$STATE")"
    total="$(wc -l <"$STATE/procs.tsv")"
    echo "$alive of $total processes alive"
    [[ "$alive" -eq "$total" ]] || return 1
}

# stop_group NAME...: SIGTERM to every named recorded process, then waits
# for all of them, SIGKILL after STOP_SECONDS.
stop_group() {
    local want=" $* " name role region pid start ports logfile i
    local pids=() starts=() names=()
    while IFS=$'\t' read -r name role region pid start ports logfile; do
        [[ "$want" == *" $name "* ]] || continue
        if same_process "$pid" "$start"; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            starts+=("$start")
            names+=("$name")
        fi
    done <"$STATE/procs.tsv"
    for ((i = 0; i < STOP_SECONDS * 10; i++)); do
        local left=0 j
        for j in "${!pids[@]}"; do
            same_process "${pids[$j]}" "${starts[$j]}" && left=1
        done
        ((left)) || return 0
        sleep 0.1
    done
    for j in "${!pids[@]}"; do
        if same_process "${pids[$j]}" "${starts[$j]}"; then
            echo "warning: ${names[$j]} (pid ${pids[$j]}) ignored SIGTERM for $STOP_SECONDS s; killing it" >&2
            kill -KILL "${pids[$j]}" 2>/dev/null || true
        fi
    done
}

# Stops every process recorded in $STATE and removes $STATE.
stop_all() {
    if [[ -f "$STATE/procs.tsv" ]]; then
        # Jobs first (they commit), then comets (they drain), logics, services.
        stop_group job-a job-b
        stop_group comet-a1 comet-a2 comet-b1 comet-b2
        stop_group logic-a logic-b
        stop_group tansu
        stop_group postgres
        if [[ -f "$STATE/zk/zoo.cfg" ]]; then
            "$ZK_SERVER" stop "$STATE/zk/zoo.cfg" </dev/null >/dev/null 2>&1 || true
        fi
        stop_group zookeeper
        stop_group redis
    fi
    rm -rf "$STATE"
    if [[ -s "$POINTER" && "$(cat "$POINTER")" == "$STATE" ]]; then
        rm -f "$POINTER"
    fi
}

cmd_stop() {
    STATE="$(existing_state)"
    if [[ -z "$STATE" ]]; then
        echo "no local cluster is running"
        rm -f "$POINTER"
        return 0
    fi
    log "stopping the local cluster in $STATE"
    stop_all
    echo "stopped"
}

main() {
    RIM_BIN="${RIM_BIN:-$ROOT/target/release/rim}"
    case "${1:-}" in
    start) cmd_start ;;
    status) cmd_status ;;
    stop) cmd_stop ;;
    *) usage ;;
    esac
}

main "$@"
