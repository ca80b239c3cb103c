#!/usr/bin/env bash
# Race raftkv against etcd 3.4 (Debian's etcd-server) on this machine: a 3-member cluster of
# each on loopback, one after the other, driven by the same client (`raftkv bench`, which
# speaks only the etcd API) with the same settings. Both fsync every write (etcd always
# does; raftkv's group commit syncs before answering). Prints a table with the ratios.
#
#   bench/compare-etcd.sh            # defaults: 20,000 requests per run
#   TOTAL=100000 bench/compare-etcd.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TOTAL=${TOTAL:-20000}

if ! command -v etcd >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server
fi
cargo build -q --release -p server --bin raftkv
RAFTKV="$PWD/target/release/raftkv"
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

ENDPOINTS=127.0.0.1:32379,127.0.0.1:32389,127.0.0.1:32399
CLUSTER=m0=http://127.0.0.1:32380,m1=http://127.0.0.1:32390,m2=http://127.0.0.1:32400

start() { # $1: etcd | raftkv
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
      "$RAFTKV" serve "${args[@]}" >"$WORK/$1-m$i.log" 2>&1 &
    fi
    PIDS+=($!)
  done
  for _ in $(seq 100); do
    "$RAFTKV" put warmup 1 --endpoints "$ENDPOINTS" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "$1 did not start" >&2; exit 1
}

stop() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); }

declare -A R
run() { # $1 system, $2 label, rest: bench args
  local sys=$1 label=$2; shift 2
  local line
  line=$("$RAFTKV" bench "$@" --endpoints "$ENDPOINTS" --total "$TOTAL" --quiet | grep '^RESULT')
  R[$sys,$label]=$line
  echo "$sys $label: ${line#RESULT }"
}

field() { sed -E "s/.*$2=([0-9.]+).*/\1/" <<<"${R[$1]}"; }

for sys in etcd raftkv; do
  start "$sys"
  run "$sys" "put, 256 clients" put --clients 256 --conns 16
  run "$sys" "put, 1 client" put --clients 1 --conns 1
  run "$sys" "linearizable get, 64 clients" get --clients 64 --conns 16
  stop
done

echo
printf '| %-30s | %12s | %12s | %7s | %14s | %14s |\n' workload "etcd ops/s" "raftkv ops/s" ratio "p50 etcd/rkv" "p99 etcd/rkv"
printf '|%s|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..32})" "$(printf -- '-%.0s' {1..14})" "$(printf -- '-%.0s' {1..14})" "$(printf -- '-%.0s' {1..9})" "$(printf -- '-%.0s' {1..16})" "$(printf -- '-%.0s' {1..16})"
for label in "put, 256 clients" "put, 1 client" "linearizable get, 64 clients"; do
  e=$(field "etcd,$label" ops_per_sec); r=$(field "raftkv,$label" ops_per_sec)
  printf '| %-30s | %12s | %12s | %6.2fx | %6s/%-7s | %6s/%-7s |\n' "$label" "$e" "$r" "$(awk -v r="$r" -v e="$e" 'BEGIN { print r / e }')" \
    "$(field "etcd,$label" p50_ms)" "$(field "raftkv,$label" p50_ms)" "$(field "etcd,$label" p99_ms)" "$(field "raftkv,$label" p99_ms)"
done
