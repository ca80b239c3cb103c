#!/usr/bin/env bash
# Race raftkv against etcd 3.4 (Debian's etcd-server) on this machine: a 3-member cluster of
# each on loopback, one after the other, driven by the same client (`raftkv bench`, which
# speaks only the etcd API) with the same settings. Both fsync every write (etcd always
# does; raftkv's group commit syncs before answering). Prints a table with the ratios.
#
# Each workload runs RUNS times (alternating systems, so a noisy spell on the shared machine
# hits both) and the table shows medians: ops/s, p50 and p99 each the median of its runs.
#
#   bench/compare-etcd.sh                    # defaults: RUNS=3, 50,000 requests per run
#   TOTAL=100000 RUNS=5 bench/compare-etcd.sh
#   SYSTEMS=raftkv bench/compare-etcd.sh     # only one side (while tuning)
#   WATCH_SECONDS=20 bench/compare-etcd.sh   # length of the watch workload (default 20 s)
#   KV_ONLY=1 bench/compare-etcd.sh          # only the put/get workloads (no watch, no lease)
#   RAFTKV_BIN=/path/to/raftkv bench/compare-etcd.sh   # a given build (for before/after)
#   DASHBOARD=1 bench/compare-etcd.sh        # raftkv with its dashboard open (a page on the
#                                            # first member; VIEWERS=3, one on each member)
#
# The watch workload (`raftkv bench-watch`): 10,000 watchers over 100 streams on the first
# member, 1,000 puts/s to it for WATCH_SECONDS; delivery latency is from the put leaving the
# client to its event reaching the watcher, and memory is the member's resident set before
# and after the watchers were created, divided by their number.
#
# The lease workload (`raftkv bench-lease`, on a fresh cluster each round): LEASES leases
# (100,000) granted, then all kept alive for LEASE_SECONDS (20) over 8 streams to the first
# member; then 10,000 leases of 10 s with a key each are renewed once and left to lapse, and
# a watch records how late after its TTL each key's delete arrives. Memory is the members'
# resident sets before and after the grants, per lease and member.
#
# "put, 256 clients, sessions" is the first workload with every put made exactly-once
# (raftkv's session metadata; etcd ignores it): the cost of deduplication on the hot path.
set -euo pipefail
cd "$(dirname "$0")/.."
TOTAL=${TOTAL:-50000}
RUNS=${RUNS:-3}
SYSTEMS=${SYSTEMS:-"etcd raftkv"}
WATCH_SECONDS=${WATCH_SECONDS:-20}
LEASES=${LEASES:-100000}
LEASE_SECONDS=${LEASE_SECONDS:-20}

if [[ $SYSTEMS == *etcd* ]] && ! command -v etcd >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server
fi
if [ -n "${RAFTKV_BIN:-}" ]; then
  RAFTKV="$RAFTKV_BIN"
else
  cargo build -q --release -p raftkv
  RAFTKV="$PWD/target/release/raftkv"
fi
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$WORK"; }
trap cleanup EXIT

ENDPOINTS=127.0.0.1:32379,127.0.0.1:32389,127.0.0.1:32399
CLUSTER=m0=http://127.0.0.1:32380,m1=http://127.0.0.1:32390,m2=http://127.0.0.1:32400

# A port still held (by a cluster left running, say) would make the next system fail to
# start while the warm-up below succeeds against the squatter: refuse to measure that.
ports_free() {
  for port in 32379 32380 32389 32390 32399 32400; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "port $port is in use; stop whatever listens there first" >&2; exit 1
    fi
  done
}

start() { # $1: etcd | raftkv
  ports_free
  PIDS=()
  for i in 0 1 2; do
    local c=$((32379 + 10 * i)) p=$((32380 + 10 * i))
    local args=(--name "m$i" --data-dir "$WORK/$1-m$i"
      --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c"
      --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p"
      --initial-cluster "$CLUSTER" --initial-cluster-state new --initial-cluster-token bench)
    if [ "$1" = etcd ]; then
      etcd "${args[@]}" >"$WORK/$1-m$i.log" 2>&1 &
    else
      [ -z "${DASHBOARD:-}" ] || args+=(--dashboard)
      "$RAFTKV" serve "${args[@]}" >"$WORK/$1-m$i.log" 2>&1 &
    fi
    PIDS+=($!)
  done
  for _ in $(seq 100); do
    if "$RAFTKV" put warmup 1 --endpoints "$ENDPOINTS" >/dev/null 2>&1; then
      for p in "${PIDS[@]}"; do
        kill -0 "$p" 2>/dev/null || { echo "$1: a member exited; see $WORK/$1-m*.log" >&2; exit 1; }
      done
      if [ "$1" = raftkv ] && [ -n "${DASHBOARD:-}" ]; then
        # An open page (the first member's live feed, read for the whole run; it makes
        # that member poll every member four times a second). VIEWERS=3: one per member.
        for i in $(seq 0 $((${VIEWERS:-1} - 1))); do
          curl -sN "http://127.0.0.1:$((32379 + 10 * i))/dashboard/events" >/dev/null 2>&1 &
          PIDS+=($!)
        done
        sleep 1
      fi
      return 0
    fi
    sleep 0.2
  done
  echo "$1 did not start" >&2; exit 1
}

# Between systems, let the disk settle (one system's dirty pages must not slow the next).
stop() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); sync; sleep 2; }

declare -A R # "system,label" -> one RESULT line per run
WORKLOADS=("put, 256 clients" "put, 256 clients, sessions" "put, 1 client" "linearizable get, 64 clients")
args_of() {
  case $1 in
    "put, 256 clients") echo put --clients 256 --conns 16 ;;
    "put, 256 clients, sessions") echo put --clients 256 --conns 16 --session ;;
    "put, 1 client") echo put --clients 1 --conns 1 ;;
    "linearizable get, 64 clients") echo get --clients 64 --conns 16 ;;
  esac
}
WATCH_LABEL="watch: 10k watchers, 1k puts/s"
run_watch() { # $1 system
  local line
  line=$("$RAFTKV" bench-watch --endpoint 127.0.0.1:32379 --member-pid "${PIDS[0]}" \
    --watchers 10000 --streams 100 --rate 1000 --seconds "$WATCH_SECONDS" | grep '^RESULT')
  R[$1,$WATCH_LABEL]+="$line"$'\n'
  echo "$1 $WATCH_LABEL: ${line#RESULT }"
}
LEASE_LABEL="leases: $LEASES kept alive"
run_lease() { # $1 system
  local line
  line=$("$RAFTKV" bench-lease --endpoints "$ENDPOINTS" --member-pids "${PIDS[0]},${PIDS[1]},${PIDS[2]}" \
    --leases "$LEASES" --seconds "$LEASE_SECONDS" --expire 10000 --expire-ttl 10 | grep '^RESULT')
  R[$1,$LEASE_LABEL]+="$line"$'\n'
  echo "$1 $LEASE_LABEL: ${line#RESULT }"
}
run() { # $1 system, $2 label
  local line
  # shellcheck disable=SC2046
  line=$("$RAFTKV" bench $(args_of "$2") --endpoints "$ENDPOINTS" --total "$TOTAL" --quiet | grep '^RESULT')
  R[$1,$2]+="$line"$'\n'
  echo "$1 $2: ${line#RESULT }"
}

# The median of field $2 over the runs of "$1".
median() {
  sed -nE "s/.*$2=([0-9.]+).*/\1/p" <<<"${R[$1]}" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

for round in $(seq "$RUNS"); do
  for sys in $SYSTEMS; do
    echo "== $sys, round $round of $RUNS"
    start "$sys"
    for label in "${WORKLOADS[@]}"; do run "$sys" "$label"; done
    if [ -n "${KV_ONLY:-}" ]; then stop; continue; fi
    run_watch "$sys"
    stop
    start "$sys"
    run_lease "$sys"
    stop
  done
done

echo
echo "medians of $RUNS runs of $TOTAL requests each"
if [[ $SYSTEMS != *etcd* || $SYSTEMS != *raftkv* ]]; then
  for sys in $SYSTEMS; do
    for label in "${WORKLOADS[@]}"; do
      printf '%-8s %-30s %8s ops/s  p50 %7s ms  p99 %7s ms\n' "$sys" "$label" "$(median "$sys,$label" ops_per_sec)" \
        "$(median "$sys,$label" p50_ms)" "$(median "$sys,$label" p99_ms)"
    done
    [ -n "${KV_ONLY:-}" ] && continue
    printf '%-8s %-30s delivery p50 %7s ms  p99 %7s ms  %s bytes per idle watcher\n' "$sys" "$WATCH_LABEL" \
      "$(median "$sys,$WATCH_LABEL" p50_ms)" "$(median "$sys,$WATCH_LABEL" p99_ms)" "$(median "$sys,$WATCH_LABEL" bytes_per_watcher)"
    printf '%-8s %-30s grants %7s/s  keep-alives %7s/s  expiry late p50 %6s ms  p99 %6s ms  %s bytes per lease\n' "$sys" "$LEASE_LABEL" \
      "$(median "$sys,$LEASE_LABEL" grants_per_sec)" "$(median "$sys,$LEASE_LABEL" keepalives_per_sec)" \
      "$(median "$sys,$LEASE_LABEL" expiry_late_p50_ms)" "$(median "$sys,$LEASE_LABEL" expiry_late_p99_ms)" \
      "$(median "$sys,$LEASE_LABEL" bytes_per_lease)"
  done
  exit 0
fi
printf '| %-30s | %12s | %12s | %7s | %16s | %16s |\n' workload "etcd ops/s" "raftkv ops/s" ratio "p50 ms etcd/rkv" "p99 ms etcd/rkv"
printf '|%s|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..32})" "$(printf -- '-%.0s' {1..14})" "$(printf -- '-%.0s' {1..14})" "$(printf -- '-%.0s' {1..9})" "$(printf -- '-%.0s' {1..18})" "$(printf -- '-%.0s' {1..18})"
for label in "${WORKLOADS[@]}"; do
  e=$(median "etcd,$label" ops_per_sec); r=$(median "raftkv,$label" ops_per_sec)
  printf '| %-30s | %12s | %12s | %6.2fx | %7s/%-8s | %7s/%-8s |\n' "$label" "$e" "$r" "$(awk -v r="$r" -v e="$e" 'BEGIN { print r / e }')" \
    "$(median "etcd,$label" p50_ms)" "$(median "raftkv,$label" p50_ms)" "$(median "etcd,$label" p99_ms)" "$(median "raftkv,$label" p99_ms)"
done
echo
printf '| %-30s | %20s | %20s | %22s |\n' workload "delivery p50 etcd/rkv" "delivery p99 etcd/rkv" "bytes/idle watcher e/r"
printf '|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..32})" "$(printf -- '-%.0s' {1..22})" "$(printf -- '-%.0s' {1..22})" "$(printf -- '-%.0s' {1..24})"
printf '| %-30s | %9s/%-10s | %9s/%-10s | %10s/%-11s |\n' "$WATCH_LABEL" \
  "$(median "etcd,$WATCH_LABEL" p50_ms)" "$(median "raftkv,$WATCH_LABEL" p50_ms)" \
  "$(median "etcd,$WATCH_LABEL" p99_ms)" "$(median "raftkv,$WATCH_LABEL" p99_ms)" \
  "$(median "etcd,$WATCH_LABEL" bytes_per_watcher)" "$(median "raftkv,$WATCH_LABEL" bytes_per_watcher)"
echo
printf '| %-28s | %18s | %22s | %22s | %22s | %18s |\n' workload "grants/s etcd/rkv" "keep-alives/s etcd/rkv" "expiry late p50 ms e/r" "expiry late p99 ms e/r" "bytes/lease e/r"
printf '|%s|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..30})" "$(printf -- '-%.0s' {1..20})" "$(printf -- '-%.0s' {1..24})" "$(printf -- '-%.0s' {1..24})" "$(printf -- '-%.0s' {1..24})" "$(printf -- '-%.0s' {1..20})"
m() { echo "$(median "etcd,$LEASE_LABEL" "$1")/$(median "raftkv,$LEASE_LABEL" "$1")"; }
printf '| %-28s | %18s | %22s | %22s | %22s | %18s |\n' "$LEASE_LABEL" "$(m grants_per_sec)" "$(m keepalives_per_sec)" \
  "$(m expiry_late_p50_ms)" "$(m expiry_late_p99_ms)" "$(m bytes_per_lease)"
