#!/usr/bin/env bash
# How long a member replaced from empty takes to catch up, raftkv beside etcd 3.4 (Debian's
# etcd-server), the same flow for both: a 3-member cluster on loopback, PUTS puts of 4 KiB
# by `raftkv bench` (64 clients, 8 connections), then one member killed and wiped, `etcdctl
# member remove`, `member add`, and a new member started with `--initial-cluster-state
# existing`. Prints, per system and run, the seconds until the newcomer serves the newest key
# (a serializable read on it), whether it received a snapshot, and the load's failed puts.
#
#   bench/catch-up.sh                          # 20,000 puts (80 MB), both systems, 3 runs
#   PUTS=50000 SNAPSHOT_COUNT=10000 bench/catch-up.sh   # past a snapshot: catch-up by snapshot
#   SYSTEMS=raftkv RAFTKV_BIN=/path/to/raftkv bench/catch-up.sh
#   KEEP_LOGS=/tmp/catch-up-logs bench/catch-up.sh   # the last run's member logs are kept there
#
# A first seed of the data-at-scale benchmark: gigabyte loads, memory and restarts are to come.
set -euo pipefail
cd "$(dirname "$0")/.."
PUTS=${PUTS:-20000}
SNAPSHOT_COUNT=${SNAPSHOT_COUNT:-100000}
RUNS=${RUNS:-3}
SYSTEMS=${SYSTEMS:-"etcd raftkv"}
source bench/lib.sh

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -z "${KEEP_LOGS:-}" ] || { mkdir -p "$KEEP_LOGS" && cp "$WORK"/*.log "$KEEP_LOGS"/; }
  rm -rf "$WORK"
}
trap cleanup EXIT
EP=127.0.0.1:17379,127.0.0.1:17389
FOUNDING="m0=http://127.0.0.1:17380,m1=http://127.0.0.1:17390,m2=http://127.0.0.1:17400"

# start SYSTEM NAME CLIENT_PORT STATE CLUSTER: one member (etcd's flags for both systems).
start() {
  local cmd=(etcd)
  [ "$1" = raftkv ] && cmd=("$RAFTKV" serve)
  "${cmd[@]}" --name "$2" --data-dir "$WORK/$2" \
    --listen-client-urls "http://127.0.0.1:$3" --advertise-client-urls "http://127.0.0.1:$3" \
    --listen-peer-urls "http://127.0.0.1:$(($3 + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$(($3 + 1))" \
    --initial-cluster "$5" --initial-cluster-state "$4" --initial-cluster-token catch-up \
    --snapshot-count "$SNAPSHOT_COUNT" --quota-backend-bytes 8589934592 >"$WORK/$2.log" 2>&1 &
  PIDS+=($!)
  LAST=$!
}

one_run() {
  local sys=$1
  rm -rf "${WORK:?}"/*
  start "$sys" m0 17379 new "$FOUNDING"
  start "$sys" m1 17389 new "$FOUNDING"
  start "$sys" m2 17399 new "$FOUNDING"
  local victim=$LAST
  retry etcdctl --endpoints=$EP put warmup 1 >/dev/null
  local failed
  failed=$("$RAFTKV" bench put --endpoints "$EP,127.0.0.1:17399" --total "$PUTS" --val-size 4096 \
    --key-space "$PUTS" --clients 64 --conns 8 --quiet | sed -n 's/^RESULT.*errors=\([0-9]*\).*/\1/p')
  retry etcdctl --endpoints=$EP put newest yes >/dev/null
  kill -9 "$victim"
  wait "$victim" 2>/dev/null || true
  rm -rf "$WORK/m2"
  local id
  id=$(retry etcdctl --endpoints=$EP member list | grep ', m2,' | cut -d, -f1)
  retry etcdctl --endpoints=$EP member remove "$id" >/dev/null
  retry etcdctl --endpoints=$EP member add m3 --peer-urls=http://127.0.0.1:17410 >/dev/null
  local t0 now
  t0=$(date +%s.%N)
  start "$sys" m3 17409 existing "m0=http://127.0.0.1:17380,m1=http://127.0.0.1:17390,m3=http://127.0.0.1:17410"
  local result="never (over 300 s)"
  while :; do
    local answer
    answer=$(etcdctl --endpoints=127.0.0.1:17409 --command-timeout=1s get newest \
      --consistency=s --print-value-only 2>/dev/null || true)
    now=$(date +%s.%N)
    if [ "$answer" = yes ]; then
      result="$(printf '%.2f' "$(echo "$now - $t0" | bc)") s"
      break
    fi
    (($(echo "$now - $t0 > 300" | bc))) && break
    sleep 0.1
  done
  # raftkv keeps snapshots in <data-dir>/snap; etcd a received one as member/snap/*.snap.db.
  local snap=no
  if [ "$sys" = raftkv ]; then
    [ -n "$(ls -A "$WORK/m3/snap" 2>/dev/null)" ] && snap=yes
  else
    compgen -G "$WORK/m3/member/snap/*.snap*" >/dev/null && snap=yes
  fi
  printf '%-7s %6d puts (failed %s)  newcomer serves the newest key after %s  (snapshot received: %s)\n' \
    "$sys" "$PUTS" "${failed:-?}" "$result" "$snap"
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
}

for run in $(seq 1 "$RUNS"); do
  for sys in $SYSTEMS; do
    one_run "$sys"
  done
done
