#!/usr/bin/env bash
# Installs and runs the services tickwire's tests need, on 127.0.0.1:
#   Apache Pulsar 4.0 standalone (from its Maven Central artifacts, Java 17),
#   PostgreSQL and Redis (Debian packages).
#
# Usage: scripts/services.sh up|down|status [pulsar|postgres|redis]...
#   up      install what is missing, start what is not running, wait until ready
#   down    stop them (data directories are removed: every `up` starts fresh)
#   status  say what runs
#   restart-pulsar [--kill]  stop Pulsar (SIGTERM, or SIGKILL) and start it
#           again on the same data directories (for restart tests)
# Idempotent: `up` twice leaves one of each running.
#
# Env (defaults):
#   TICKWIRE_SERVICES_DIR  /var/tmp/tickwire-services   state, data and logs
#   TICKWIRE_PULSAR_LIB    /var/tmp/tickwire-pulsar/lib  resolved jars (kept: a cache)
#   PULSAR_PORT 6650  PULSAR_HTTP_PORT 8080  PG_PORT 5432  REDIS_PORT 6379
#   PULSAR_READY_TIMEOUT   240 (seconds)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
state=${TICKWIRE_SERVICES_DIR:-/var/tmp/tickwire-services}
pulsar_lib=${TICKWIRE_PULSAR_LIB:-/var/tmp/tickwire-pulsar/lib}
pulsar_port=${PULSAR_PORT:-6650}
pulsar_http=${PULSAR_HTTP_PORT:-8080}
pg_port=${PG_PORT:-5432}
redis_port=${REDIS_PORT:-6379}
pulsar_timeout=${PULSAR_READY_TIMEOUT:-240}
mkdir -p "$state"

say() { printf 'services: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

check_port_free() { # name port
    if port_busy "$2"; then die "$1: port $2 on 127.0.0.1 is taken by something else; free it or set its *_PORT"; fi
}

check_disk() { # dir MiB
    mkdir -p "$1"
    local avail
    avail=$(df -Pm "$1" | awk 'NR == 2 { print $4 }')
    [ "${avail:-0}" -ge "$2" ] || die "only ${avail} MiB free under $1; need $2 MiB"
}

apt_updated=
apt_install() { # packages...
    local missing=()
    for p in "$@"; do
        # Installed means "install ok installed", not a removed package's leftover config.
        [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ -n "$apt_updated" ] || { say "apt-get update"; apt-get update -qq >/dev/null; apt_updated=1; }
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() { # name timeout log [pidfile] check-command...
    local name=$1 timeout=$2 log=$3; shift 3
    local pidf=
    case "${1:-}" in *.pid) pidf=$1; shift ;; esac
    local start=$SECONDS
    until "$@" >/dev/null 2>&1; do
        if [ -n "$pidf" ] && ! pid_alive "$pidf"; then
            say "$name exited while starting; its log ($log):"
            tail -n 80 "$log" >&2 || true
            return 1
        fi
        if [ $((SECONDS - start)) -ge "$timeout" ]; then
            say "$name did not become ready within ${timeout}s; its log ($log):"
            tail -n 80 "$log" >&2 || true
            return 1
        fi
        sleep 1
    done
    say "$name ready after $((SECONDS - start))s"
}

# ---------------------------------------------------------------- Pulsar
pulsar_java() {
    if [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ]; then echo "$JAVA_HOME/bin/java"; return; fi
    for j in /usr/lib/jvm/java-17-openjdk-amd64/bin/java /usr/lib/jvm/temurin-17-jdk-amd64/bin/java; do
        [ -x "$j" ] && { echo "$j"; return; }
    done
    command -v java || die "no Java 17 found (set JAVA_HOME)"
}

pulsar_install() {
    local lock="$here/pulsar/jars.lock"
    if [ -f "$pulsar_lib/.complete" ] && cmp -s "$pulsar_lib/.complete" "$lock"; then return 0; fi
    command -v mvn >/dev/null || apt_install maven
    mkdir -p "$pulsar_lib"
    check_disk "$pulsar_lib" 1024
    say "resolving Apache Pulsar jars from Maven Central into $pulsar_lib (first time only)"
    rm -rf "$pulsar_lib"
    mkdir -p "$pulsar_lib"
    mvn -q -B -s "$here/pulsar/settings.xml" -f "$here/pulsar/pom.xml" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$pulsar_lib" \
        || die "maven could not resolve the Pulsar jars"
    # The resolved jar list is pinned: a run is reproducible, and a change shows up here.
    (cd "$pulsar_lib" && ls -1 ./*.jar | sed 's|^\./||' | LC_ALL=C sort) >"$state/jars.resolved"
    if [ -f "$lock" ] && ! cmp -s "$state/jars.resolved" "$lock"; then
        diff "$lock" "$state/jars.resolved" >&2 || true
        die "resolved Pulsar jars differ from scripts/pulsar/jars.lock (above); update the lock on purpose"
    fi
    [ -f "$lock" ] || cp "$state/jars.resolved" "$lock"
    cp "$lock" "$pulsar_lib/.complete"
}

pulsar_config() {
    local conf=$1 data=$2
    cat >"$conf" <<EOF
clusterName=standalone
bindAddress=127.0.0.1
advertisedAddress=127.0.0.1
brokerServicePort=$pulsar_port
webServicePort=$pulsar_http
loadManagerClassName=org.apache.pulsar.broker.loadbalance.NoopLoadManager
allowAutoTopicCreation=true
allowAutoTopicCreationType=non-partitioned
managedLedgerDefaultEnsembleSize=1
managedLedgerDefaultWriteQuorum=1
managedLedgerDefaultAckQuorum=1
managedLedgerCacheSizeMB=64
brokerDeleteInactiveTopicsEnabled=false
# A graceful stop gets time to close every topic and the bookie cleanly
# (under pulsar_stop's 30 s): cut short, the bookie's unflushed journal
# buffer (journalSyncData=false below) goes with the process.
brokerShutdownTimeoutMs=20000
functionsWorkerEnabled=false
# No topic-level policies (nothing here sets any): with them on, loading any
# topic first waits for a reader of the namespace's __change_events system
# topic, and after a restart that reader can hang for good (apache/pulsar
# #25294 and kin). Seen here: a restarted standalone whose health check
# never loaded its topic within 240 s.
systemTopicEnabled=false
topicLevelPoliciesEnabled=false
# BookKeeper (one bookie, inside the standalone process)
journalSyncData=false
journalWriteData=true
dbStorage_writeCacheMaxSizeMb=32
dbStorage_readAheadCacheMaxSizeMb=32
dbStorage_rocksDB_blockCacheSize=16777216
diskUsageThreshold=0.99
diskUsageWarnThreshold=0.98
isForceGCAllowWhenNoSpace=true
EOF
}

# Healthy, and the standalone has created public/default (it does so after
# the health check first passes: a producer would get "Namespace not found").
pulsar_ready() {
    curl -sf --max-time 5 "http://127.0.0.1:$pulsar_http/admin/v2/brokers/health" | grep -q ok &&
        curl -sf --max-time 5 "http://127.0.0.1:$pulsar_http/admin/v2/namespaces/public" | grep -q '"public/default"'
}

pulsar_up() {
    local pidf="$state/pulsar.pid" log="$state/pulsar.log"
    if pid_alive "$pidf"; then wait_for pulsar "$pulsar_timeout" "$log" "$pidf" pulsar_ready; return; fi
    local keep=${1:-}
    command -v curl >/dev/null || apt_install curl
    pulsar_install
    check_port_free pulsar "$pulsar_port"
    check_port_free pulsar-http "$pulsar_http"
    check_disk "$state" 2048
    local data="$state/pulsar-data"
    [ "$keep" = keep ] || rm -rf "$data"
    mkdir -p "$data"
    pulsar_config "$state/standalone.conf" "$data"
    local java; java=$(pulsar_java)
    say "starting Pulsar standalone ($("$java" -version 2>&1 | head -1))"
    # A restart on the same data keeps the log of the run before it.
    if [ "$keep" = keep ]; then echo "==== services: restarted $(date -u +%FT%TZ)" >>"$log"; else : >"$log"; fi
    PULSAR_STANDALONE_USE_ZOOKEEPER= nohup "$java" \
        -Xms1g -Xmx1g -XX:MaxDirectMemorySize=1g -XX:+UseG1GC \
        --add-opens java.base/java.io=ALL-UNNAMED --add-opens java.base/java.util.zip=ALL-UNNAMED \
        --add-opens java.base/java.nio=ALL-UNNAMED --add-opens java.base/jdk.internal.misc=ALL-UNNAMED \
        --add-opens java.base/sun.net=ALL-UNNAMED --add-opens java.management/sun.management=ALL-UNNAMED \
        --add-opens java.base/java.lang=ALL-UNNAMED \
        -Dio.netty.tryReflectionSetAccessible=true \
        -Dbookkeeper.metadata.bookie.drivers=org.apache.pulsar.metadata.bookkeeper.PulsarMetadataBookieDriver \
        -Dbookkeeper.metadata.client.drivers=org.apache.pulsar.metadata.bookkeeper.PulsarMetadataClientDriver \
        -Dpulsar.log.dir="$state" -Dpulsar.log.file=pulsar.log -Dlog4j2.formatMsgNoLookups=true \
        -cp "$pulsar_lib/*" org.apache.pulsar.PulsarStandaloneStarter \
        --config "$state/standalone.conf" -nfw -nss -a 127.0.0.1 \
        --metadata-dir "$data/metadata" --bookkeeper-dir "$data/bookkeeper" \
        >>"$log" 2>&1 &
    echo $! >"$pidf"
    wait_for pulsar "$pulsar_timeout" "$log" "$pidf" pulsar_ready
}

pulsar_stop() { # [signal]
    local pidf="$state/pulsar.pid" sig=${1:-TERM}
    if pid_alive "$pidf"; then
        local start=$SECONDS
        kill -"$sig" "$(cat "$pidf")" 2>/dev/null || true
        for _ in $(seq 1 60); do pid_alive "$pidf" || break; sleep 0.5; done
        if pid_alive "$pidf"; then
            say "pulsar did not stop within 30s of SIG$sig; SIGKILL"
            kill -9 "$(cat "$pidf")" 2>/dev/null || true
            while pid_alive "$pidf"; do sleep 0.1; done
        else
            say "pulsar stopped (SIG$sig) after $((SECONDS - start))s"
        fi
    fi
    rm -f "$pidf"
}

pulsar_down() {
    pulsar_stop TERM
    rm -rf "$state/pulsar-data"
}

pulsar_restart() { # [--kill]
    if [ "${1:-}" = --kill ]; then pulsar_stop KILL; else pulsar_stop TERM; fi
    pulsar_up keep
}

pulsar_status() { if pid_alive "$state/pulsar.pid" && pulsar_ready; then echo "pulsar: up on 127.0.0.1:$pulsar_port (admin :$pulsar_http)"; else echo "pulsar: down"; fi; }

# ------------------------------------------------------------ PostgreSQL
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }

pg_ready() { "$(pg_bin)/pg_isready" -h 127.0.0.1 -p "$pg_port" -q; }

postgres_up() {
    local data="$state/pg-data" log="$state/postgres.log"
    if [ -f "$data/postmaster.pid" ] && pg_ready; then say "postgres already up"; return; fi
    apt_install postgresql
    check_port_free postgres "$pg_port"
    check_disk "$state" 512
    rm -rf "$data"
    mkdir -p "$data"
    chown postgres:postgres "$data"
    touch "$log" && chown postgres:postgres "$log"
    # PostgreSQL refuses to run as root: the postgres user owns this cluster.
    su postgres -s /bin/sh -c "'$(pg_bin)/initdb' -D '$data' -U postgres --auth=trust -E UTF8 >/dev/null"
    su postgres -s /bin/sh -c "'$(pg_bin)/pg_ctl' -D '$data' -l '$log' -o \"-p $pg_port -c listen_addresses=127.0.0.1 -k /tmp -c fsync=off\" start >/dev/null"
    wait_for postgres 60 "$log" pg_ready
    su postgres -s /bin/sh -c "psql -h 127.0.0.1 -p $pg_port -U postgres -qc \"CREATE ROLE tickwire LOGIN SUPERUSER PASSWORD 'tickwire'\" >/dev/null; psql -h 127.0.0.1 -p $pg_port -U postgres -qc 'CREATE DATABASE tickwire OWNER tickwire' >/dev/null" || true
}

postgres_down() {
    local data="$state/pg-data"
    if [ -f "$data/postmaster.pid" ] && [ -n "$(pg_bin)" ]; then
        su postgres -s /bin/sh -c "'$(pg_bin)/pg_ctl' -D '$data' -m fast stop >/dev/null" || true
    fi
    rm -rf "$data"
}

postgres_status() { if [ -n "$(pg_bin)" ] && pg_ready; then echo "postgres: up on 127.0.0.1:$pg_port (postgres://tickwire:tickwire@127.0.0.1:$pg_port/tickwire)"; else echo "postgres: down"; fi; }

# ----------------------------------------------------------------- Redis
redis_ready() { redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null | grep -q PONG; }

redis_up() {
    local log="$state/redis.log"
    if pid_alive "$state/redis.pid" && redis_ready; then say "redis already up"; return; fi
    apt_install redis-server
    check_port_free redis "$redis_port"
    mkdir -p "$state/redis-data"
    redis-server --bind 127.0.0.1 --port "$redis_port" --daemonize yes --pidfile "$state/redis.pid" \
        --dir "$state/redis-data" --save '' --appendonly no --logfile "$log"
    wait_for redis 30 "$log" redis_ready
}

redis_down() {
    if pid_alive "$state/redis.pid"; then redis-cli -h 127.0.0.1 -p "$redis_port" shutdown nosave >/dev/null 2>&1 || kill "$(cat "$state/redis.pid")" || true; fi
    rm -f "$state/redis.pid"
    rm -rf "$state/redis-data"
}

redis_status() { if redis_ready; then echo "redis: up on 127.0.0.1:$redis_port"; else echo "redis: down"; fi; }

# ------------------------------------------------------------------ main
cmd=${1:-status}
shift || true
if [ "$cmd" = restart-pulsar ]; then
    pulsar_restart "${1:-}"
    exit 0
fi
services=("$@")
[ ${#services[@]} -gt 0 ] || services=(postgres redis pulsar)
for s in "${services[@]}"; do
    case "$s" in pulsar | postgres | redis) ;; *) die "unknown service $s (pulsar, postgres, redis)" ;; esac
done
case "$cmd" in
    up) for s in "${services[@]}"; do "${s}_up"; done ;;
    down) for s in "${services[@]}"; do "${s}_down"; done ;;
    status) for s in "${services[@]}"; do "${s}_status"; done ;;
    *) die "usage: $0 up|down|status [pulsar|postgres|redis]..." ;;
esac
