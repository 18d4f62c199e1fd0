#!/usr/bin/env bash
# Runs the whole test suite, including the tests that need real services.
#
# 1. Installs what is missing: Debian packages redis-server, zookeeperd,
#    postgresql, chromium, libssl-dev and pkg-config, tests/browser's npm dependency (playwright-core, which drives
#    Debian's Chromium), and the Kafka-protocol broker tansu (cargo install,
#    ~10 min on 2 cores).
# 2. Starts throwaway Redis, a 3-master Redis Cluster, ZooKeeper, two PostgreSQL primaries
#    (initdb'd as the postgres user, database "rim", trust auth on loopback)
#    and tansu servers on 127.0.0.1 with their data in a temp dir, and creates
#    the topic rim-push.
# 3. Runs `cargo test --workspace --all-targets -- --include-ignored` (or,
#    given arguments, `cargo test <arguments> -- --include-ignored`) with
#    RIM_TEST_REDIS, RIM_TEST_REDIS_CLUSTER (comma-separated seed URLs),
#    RIM_TEST_ZK, RIM_TEST_KAFKA, RIM_TEST_POSTGRES and RIM_TEST_POSTGRES_2 (the second
#    primary, for the sharded store) pointing at them, and
#    RIM_TEST_LOCAL_CLUSTER=1 (the deploy kit's local-cluster test).
# 4. Stops the servers (by PID) and removes the temp dir on exit.
#
# Environment overrides:
#   RIM_TEST_REDIS_PORT  (default 16379)
#   RIM_TEST_REDIS_CLUSTER_PORT  (default 17000; the nodes use it and the next
#                                 two ports, and each port + 10000 for the bus)
#   RIM_TEST_ZK_PORT     (default 12181)
#   RIM_TEST_KAFKA_PORT  (default 19092)
#   RIM_TEST_POSTGRES_PORT (default 15432; the second primary uses the next port)
#   RIM_TEST_KEEP_SERVICES=1  leave the servers and temp dir behind for debugging
#
# Runs as root on Debian 12; CI runs it via .ci/run (no stdin).
set -euo pipefail

readonly REDIS_PORT="${RIM_TEST_REDIS_PORT:-16379}"
readonly CLUSTER_PORT="${RIM_TEST_REDIS_CLUSTER_PORT:-17000}"
readonly CLUSTER_NODES=3 # masters, no replicas
readonly ZK_PORT="${RIM_TEST_ZK_PORT:-12181}"
readonly KAFKA_PORT="${RIM_TEST_KAFKA_PORT:-19092}"
readonly PG_PORT="${RIM_TEST_POSTGRES_PORT:-15432}"
readonly PG2_PORT="$((PG_PORT + 1))"
readonly TANSU_VERSION="0.6.0"
readonly TOPIC="rim-push"
readonly TOPIC_PARTITIONS=4
readonly READY_TRIES=60 # x 0.5 s = about 30 s per service
readonly ZK_SERVER=/usr/share/zookeeper/bin/zkServer.sh

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
export DEBIAN_FRONTEND=noninteractive

cd "$(dirname "${BASH_SOURCE[0]}")/.."

WORK=""      # temp dir with all service data and logs
TANSU_PID="" # background tansu broker

log() { echo "==> $*" >&2; }

die() {
    echo "error: $*" >&2
    exit 1
}

# Prints the last lines of a log file (if any) to stderr.
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

# True when something accepts TCP connections on 127.0.0.1:$1.
tcp_open() {
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

require_free_port() {
    local name="$1" port="$2" var="$3"
    if tcp_open "$port"; then
        die "port $port for $name is already in use on 127.0.0.1 (set $var to another port)"
    fi
}

# wait_ready NAME LOGFILE CMD...: retries CMD for about 30 s.
wait_ready() {
    local name="$1" logfile="$2" i
    shift 2
    for ((i = 0; i < READY_TRIES; i++)); do
        if "$@"; then
            log "$name is ready"
            return 0
        fi
        sleep 0.5
    done
    echo "error: $name did not become ready within $((READY_TRIES / 2)) s" >&2
    show_log "$logfile"
    exit 1
}

# Sends SIGTERM to a PID and waits up to 10 s, then SIGKILL.
stop_pid() {
    local name="$1" pid="$2" i
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 20; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    echo "warning: $name (pid $pid) ignored SIGTERM; killing it" >&2
    kill -9 "$pid" 2>/dev/null || true
}

# ------------------------------------------------------------- install

install_packages() {
    local missing=() pkg
    # chromium and nodejs/npm drive the browser demo test; libssl-dev and
    # pkg-config build librdkafka with TLS (rdkafka's ssl feature).
    for pkg in redis-server zookeeperd postgresql chromium libssl-dev pkg-config; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt-get update -qq </dev/null
        apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
    fi
}

# playwright-core (pinned in tests/browser/package-lock.json) drives Debian's
# Chromium; it downloads no browser of its own.
install_browser_deps() {
    command -v node >/dev/null && command -v npm >/dev/null || {
        log "installing nodejs and npm"
        apt-get install -y -qq --no-install-recommends nodejs npm </dev/null >/dev/null
    }
    if [[ ! -d tests/browser/node_modules/playwright-core ]] \
        || [[ tests/browser/package-lock.json -nt tests/browser/node_modules ]]; then
        log "npm ci in tests/browser"
        (cd tests/browser && npm ci --no-audit --no-fund --silent </dev/null) \
            || die "npm ci in tests/browser failed"
    fi
}

install_tansu() {
    if command -v tansu >/dev/null && [[ "$(tansu --version 2>/dev/null)" == *" $TANSU_VERSION"* ]]; then
        return 0
    fi
    command -v cargo >/dev/null || die "cargo is not on PATH; install Rust first"
    log "installing tansu $TANSU_VERSION (cargo install, about 10 minutes)"
    if ! cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql \
        </dev/null >"$WORK/tansu-install.log" 2>&1; then
        show_log "$WORK/tansu-install.log"
        die "cargo install tansu $TANSU_VERSION failed"
    fi
}

# ------------------------------------------------------------- services

start_redis() {
    require_free_port Redis "$REDIS_PORT" RIM_TEST_REDIS_PORT
    mkdir -p "$WORK/redis"
    log "starting Redis on 127.0.0.1:$REDIS_PORT"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --daemonize yes --pidfile "$WORK/redis/redis.pid" --dir "$WORK/redis" \
        --logfile "$WORK/redis/redis.log" </dev/null
    wait_ready Redis "$WORK/redis/redis.log" redis_ready
}

redis_ready() {
    [[ "$(timeout 2 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]
}

stop_redis() {
    if [[ -s "$WORK/redis/redis.pid" ]]; then
        stop_pid Redis "$(cat "$WORK/redis/redis.pid")"
    fi
}

# Ports of the Redis Cluster nodes, one per line.
cluster_ports() {
    seq "$CLUSTER_PORT" $((CLUSTER_PORT + CLUSTER_NODES - 1))
}

start_redis_cluster() {
    local port addrs=()
    for port in $(cluster_ports); do
        require_free_port "Redis Cluster node" "$port" RIM_TEST_REDIS_CLUSTER_PORT
        require_free_port "Redis Cluster bus" $((port + 10000)) RIM_TEST_REDIS_CLUSTER_PORT
    done
    for port in $(cluster_ports); do
        local dir="$WORK/redis-cluster/$port"
        mkdir -p "$dir"
        log "starting Redis Cluster node on 127.0.0.1:$port"
        redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
            --cluster-config-file "$dir/nodes-$port.conf" --save "" --appendonly no \
            --daemonize yes --pidfile "$dir/redis.pid" --dir "$dir" \
            --logfile "$dir/redis.log" </dev/null
        wait_ready "Redis Cluster node $port" "$dir/redis.log" redis_node_ready "$port"
        addrs+=("127.0.0.1:$port")
    done
    log "creating the Redis Cluster on ${addrs[*]}"
    if ! timeout 60 redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes \
        </dev/null >"$WORK/redis-cluster/create.log" 2>&1; then
        show_log "$WORK/redis-cluster/create.log"
        die "redis-cli --cluster create failed"
    fi
    wait_ready "Redis Cluster" "$WORK/redis-cluster/$CLUSTER_PORT/redis.log" redis_cluster_ready
}

redis_node_ready() {
    [[ "$(timeout 2 redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" == PONG ]]
}

# True when every node sees the cluster as ok (all slots covered and agreed).
redis_cluster_ready() {
    local port
    for port in $(cluster_ports); do
        [[ "$(timeout 2 redis-cli -h 127.0.0.1 -p "$port" cluster info 2>/dev/null)" == *cluster_state:ok* ]] ||
            return 1
    done
}

stop_redis_cluster() {
    local port pidfile
    for port in $(cluster_ports); do
        pidfile="$WORK/redis-cluster/$port/redis.pid"
        if [[ -s "$pidfile" ]]; then
            stop_pid "Redis Cluster node $port" "$(cat "$pidfile")"
        fi
    done
}

# Comma-separated seed URLs of the Redis Cluster.
cluster_urls() {
    local port urls=()
    for port in $(cluster_ports); do
        urls+=("redis://127.0.0.1:$port")
    done
    (
        IFS=,
        echo "${urls[*]}"
    )
}

# Debian's zkEnv.sh hard-codes ZOO_LOG_DIR=/var/log/zookeeper, so the
# server's stdout goes there whatever we set; its log4j logging is a no-op
# (no slf4j binding on the classpath). Data and pid file live in $WORK.
zk_out() {
    echo "/var/log/zookeeper/zookeeper-${USER:-}-server-${HOSTNAME:-$(hostname)}.out"
}

start_zookeeper() {
    require_free_port ZooKeeper "$ZK_PORT" RIM_TEST_ZK_PORT
    mkdir -p "$WORK/zk/data"
    cat >"$WORK/zk/zoo.cfg" <<EOF
tickTime=500
initLimit=10
syncLimit=5
dataDir=$WORK/zk/data
clientPort=$ZK_PORT
clientPortAddress=127.0.0.1
maxSessionTimeout=60000
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr
EOF
    log "starting ZooKeeper on 127.0.0.1:$ZK_PORT"
    ZOO_LOG_DIR="$WORK/zk" JMXDISABLE=true SERVER_JVMFLAGS="-Xmx256m" \
        "$ZK_SERVER" start "$WORK/zk/zoo.cfg" </dev/null >"$WORK/zk/zkServer.log" 2>&1 ||
        {
            show_log "$WORK/zk/zkServer.log"
            die "zkServer.sh start failed"
        }
    wait_ready ZooKeeper "$(zk_out)" zk_ready
}

zk_ready() {
    [[ "$(timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && printf srvr >&3 && cat <&3' _ "$ZK_PORT" 2>/dev/null)" == *"Mode: "* ]]
}

stop_zookeeper() {
    local pidfile="$WORK/zk/data/zookeeper_server.pid" pid
    [[ -s "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    "$ZK_SERVER" stop "$WORK/zk/zoo.cfg" </dev/null >/dev/null 2>&1 || true
    stop_pid ZooKeeper "$pid"
}

start_tansu() {
    require_free_port tansu "$KAFKA_PORT" RIM_TEST_KAFKA_PORT
    local url="tcp://127.0.0.1:$KAFKA_PORT"
    log "starting tansu on 127.0.0.1:$KAFKA_PORT"
    tansu broker --listener-url "$url" --advertised-listener-url "$url" \
        --storage-engine memory://tansu/ </dev/null >"$WORK/tansu.log" 2>&1 &
    TANSU_PID=$!
    wait_ready tansu "$WORK/tansu.log" tansu_ready
    log "creating topic $TOPIC ($TOPIC_PARTITIONS partitions)"
    if ! timeout 30 tansu topic create "$TOPIC" --partitions "$TOPIC_PARTITIONS" --broker "$url" \
        </dev/null >"$WORK/tansu-topic.log" 2>&1; then
        show_log "$WORK/tansu-topic.log"
        show_log "$WORK/tansu.log"
        die "creating topic $TOPIC on tansu failed"
    fi
}

tansu_ready() {
    kill -0 "$TANSU_PID" 2>/dev/null || {
        show_log "$WORK/tansu.log"
        die "tansu exited during startup"
    }
    tcp_open "$KAFKA_PORT"
}

stop_tansu() {
    stop_pid tansu "$TANSU_PID"
}

# Debian's newest installed PostgreSQL server binaries (initdb, pg_ctl).
pg_bindir() {
    local dir
    dir="$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)"
    [[ -x "$dir/initdb" ]] || die "PostgreSQL server binaries not found under /usr/lib/postgresql (package postgresql)"
    echo "$dir"
}

# initdb refuses to run as root: the cluster belongs to the postgres user
# the package creates, in a directory of its own under $WORK. Two primaries
# (the sharded store's tests spread one store over both): $WORK/pg on
# PG_PORT and $WORK/pg2 on PG_PORT + 1.
start_postgres() {
    start_postgres_at "$WORK/pg" "$PG_PORT"
    start_postgres_at "$WORK/pg2" "$PG2_PORT"
}

start_postgres_at() {
    local dir="$1" port="$2" bin
    require_free_port PostgreSQL "$port" RIM_TEST_POSTGRES_PORT
    bin="$(pg_bindir)"
    chmod 711 "$WORK"
    mkdir -p "$dir"
    chown postgres: "$dir"
    log "starting PostgreSQL on 127.0.0.1:$port"
    if ! runuser -u postgres -- "$bin/initdb" -D "$dir/data" -U rim --auth=trust \
        </dev/null >"$dir/initdb.log" 2>&1; then
        show_log "$dir/initdb.log"
        die "initdb failed"
    fi
    if ! runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 30 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1" start \
        </dev/null >"$dir/pg_ctl.log" 2>&1; then
        show_log "$dir/postgres.log"
        die "PostgreSQL did not start"
    fi
    wait_ready PostgreSQL "$dir/postgres.log" pg_ready "$port"
    if ! runuser -u postgres -- "$bin/createdb" -h 127.0.0.1 -p "$port" -U rim rim \
        </dev/null >"$dir/createdb.log" 2>&1; then
        show_log "$dir/createdb.log"
        die "createdb rim failed"
    fi
}

pg_ready() {
    timeout 2 psql -h 127.0.0.1 -p "$1" -U rim -d postgres -Atc 'select 1' 2>/dev/null | grep -qx 1
}

# Fast shutdown by the postmaster's PID (SIGINT), then stop_pid's fallback.
stop_postgres() {
    local pidfile pid
    for pidfile in "$WORK/pg/data/postmaster.pid" "$WORK/pg2/data/postmaster.pid"; do
        [[ -s "$pidfile" ]] || continue
        pid="$(head -n 1 "$pidfile")"
        kill -INT "$pid" 2>/dev/null || true
        stop_pid PostgreSQL "$pid"
    done
}

# ------------------------------------------------------------- main

cleanup() {
    local rc=$?
    set +e
    [[ -n "$WORK" ]] || exit "$rc"
    if [[ "${RIM_TEST_KEEP_SERVICES:-}" == 1 ]]; then
        echo "RIM_TEST_KEEP_SERVICES=1: leaving services running, data in $WORK" >&2
        echo "  redis pid $(cat "$WORK/redis/redis.pid" 2>/dev/null), zookeeper pid" \
            "$(cat "$WORK/zk/data/zookeeper_server.pid" 2>/dev/null), tansu pid ${TANSU_PID:-}," \
            "postgres pids $(head -n 1 "$WORK/pg/data/postmaster.pid" 2>/dev/null)" \
            "$(head -n 1 "$WORK/pg2/data/postmaster.pid" 2>/dev/null)" >&2
        echo "  redis cluster pids" "$(cat "$WORK"/redis-cluster/*/redis.pid 2>/dev/null | tr '\n' ' ')" >&2
        exit "$rc"
    fi
    stop_tansu
    stop_postgres
    stop_zookeeper
    stop_redis_cluster
    stop_redis
    rm -rf "$WORK"
    exit "$rc"
}

main() {
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/rim-test.XXXXXX")"
    trap cleanup EXIT
    trap 'exit 130' INT TERM

    install_packages
    install_browser_deps
    install_tansu

    start_redis
    start_redis_cluster
    start_zookeeper
    start_tansu
    start_postgres

    export RIM_TEST_REDIS="redis://127.0.0.1:$REDIS_PORT"
    RIM_TEST_REDIS_CLUSTER="$(cluster_urls)"
    export RIM_TEST_REDIS_CLUSTER
    export RIM_TEST_ZK="127.0.0.1:$ZK_PORT"
    export RIM_TEST_KAFKA="127.0.0.1:$KAFKA_PORT"
    export RIM_TEST_POSTGRES="postgres://rim@127.0.0.1:$PG_PORT/rim"
    export RIM_TEST_POSTGRES_2="postgres://rim@127.0.0.1:$PG2_PORT/rim"
    # tests/deploy_kit.rs runs deploy/local-cluster.sh (its own Redis,
    # ZooKeeper and tansu on ports 25001-25299, with the packages above).
    export RIM_TEST_LOCAL_CLUSTER=1
    log "RIM_TEST_REDIS=$RIM_TEST_REDIS RIM_TEST_REDIS_CLUSTER=$RIM_TEST_REDIS_CLUSTER"
    log "RIM_TEST_ZK=$RIM_TEST_ZK RIM_TEST_KAFKA=$RIM_TEST_KAFKA"
    log "RIM_TEST_POSTGRES=$RIM_TEST_POSTGRES RIM_TEST_POSTGRES_2=$RIM_TEST_POSTGRES_2"
    # Arguments narrow the run while iterating (deploy/test.sh -p rim --test cluster);
    # without them, everything runs.
    local args=(--workspace --all-targets)
    (($#)) && args=("$@")
    log "cargo test ${args[*]} -- --include-ignored"
    if ! cargo test "${args[@]}" -- --include-ignored </dev/null; then
        echo "error: cargo test failed; tansu log:" >&2
        show_log "$WORK/tansu.log"
        exit 1
    fi
    log "all tests passed"
}

main "$@"
