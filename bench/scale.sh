#!/usr/bin/env bash
# Data at scale, raftkv beside etcd 3.4 (Debian's etcd-server), the same flow for both: a
# 3-member cluster on loopback (etcd's flags, an 8 GiB quota), ROUNDS rounds of ROUND_PUTS
# puts of 4 KiB values by `raftkv bench` (64 clients over 8 connections), new keys each
# round. Per round it prints puts/s, p99, failed puts, the leader changes the round caused,
# every member's resident memory (now, peak, and the anonymous part of now: its heap) and
# the data directories' size. Then the restarts: a follower killed -9 until its first
# linearizable read, and the whole cluster killed -9 until its first write.
# (bench/catch-up.sh times a member replaced from empty.)
#
#   bench/scale.sh                                  # 4 × 75,000 puts: 1.2 GB written
#   ROUNDS=2 ROUND_PUTS=50000 SNAPSHOT_COUNT=40000 bench/scale.sh   # smaller, past a snapshot
#   SYSTEMS=raftkv RAFTKV_BIN=/path/to/raftkv bench/scale.sh
#   MEMORY_LIMIT_MB=600 bench/scale.sh            # each member in a cgroup of 600 MB (root)
#   KEEP_LOGS=/tmp/scale-logs bench/scale.sh      # the members' logs are kept there
#
# With MEMORY_LIMIT_MB, after the rounds every member must still answer a read of a key
# from each round with the value written; the script says which members died or answered
# wrong.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-4}
ROUND_PUTS=${ROUND_PUTS:-75000}
VAL_SIZE=${VAL_SIZE:-4096}
SNAPSHOT_COUNT=${SNAPSHOT_COUNT:-100000}
SYSTEMS=${SYSTEMS:-"etcd raftkv"}
source bench/lib.sh

WORK=${SCALE_DIR:-$(mktemp -d)}
mkdir -p "$WORK"
declare -A PID
cleanup() {
  for p in "${PID[@]:-}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  unlimit_all
  [ -z "${KEEP_LOGS:-}" ] || { mkdir -p "$KEEP_LOGS" && cp "$WORK"/*.log "$KEEP_LOGS"/; }
  rm -rf "$WORK"
}
trap cleanup EXIT
NAMES=(m0 m1 m2)
declare -A PORT=([m0]=17379 [m1]=17389 [m2]=17399)
EP=127.0.0.1:17379,127.0.0.1:17389,127.0.0.1:17399
CLUSTER="m0=http://127.0.0.1:17380,m1=http://127.0.0.1:17390,m2=http://127.0.0.1:17400"
secs_since() { printf '%.2f' "$(echo "$(date +%s.%N) - $1" | bc)"; }

# start SYSTEM NAME STATE: one member (etcd's flags for both systems).
start() {
  local cmd=(etcd) port=${PORT[$2]}
  [ "$1" = raftkv ] && cmd=("$RAFTKV" serve)
  "${cmd[@]}" --name "$2" --data-dir "$WORK/$2" \
    --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
    --listen-peer-urls "http://127.0.0.1:$((port + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((port + 1))" \
    --initial-cluster "$CLUSTER" --initial-cluster-state "$3" --initial-cluster-token scale \
    --snapshot-count "$SNAPSHOT_COUNT" --quota-backend-bytes 8589934592 >>"$WORK/$2.log" 2>&1 &
  PID[$2]=$!
  [ -z "${MEMORY_LIMIT_MB:-}" ] || limit_memory "${PID[$2]}" "$MEMORY_LIMIT_MB"
}

# Every member answers, for a key of each round, the value the round wrote (`raftkv bench`
# writes VAL_SIZE bytes of 'v' under an 8-digit key). Prints the members that died or
# answered wrong.
check_reads() {
  local bad=0
  for m in "${NAMES[@]}"; do
    if ! kill -0 "${PID[$m]}" 2>/dev/null; then
      echo "  $m died (see $WORK/$m.log; dmesg for the OOM killer)"; bad=1; continue
    fi
    for r in $(seq 0 $((ROUNDS - 1))); do
      local key got
      key=$(printf '%08d' $((r * ROUND_PUTS + ROUND_PUTS / 2)))
      got=$(etcdctl --endpoints=127.0.0.1:${PORT[$m]} --command-timeout=5s get "$key" \
        --consistency=s --print-value-only 2>/dev/null | tr -d '\n' | tr -s v)
      [ "$got" = v ] || { echo "  $m: $key answered '${got:0:20}', not $VAL_SIZE bytes of v"; bad=1; }
    done
  done
  [ $bad = 0 ] && echo "  every member answers a key of every round in full"
}

# The most leader changes any member has seen.
leader_changes() {
  local most=0 n
  for m in "${NAMES[@]}"; do
    n=$(curl -s "http://127.0.0.1:${PORT[$m]}/metrics" |
      sed -n 's/^etcd_server_leader_changes_seen_total \([0-9]*\).*/\1/p')
    [ "${n:-0}" -gt "$most" ] && most=$n
  done
  echo "$most"
}

# Resident memory of every member in MB: now/peak/anonymous (the heap's part of "now"; the
# rest is mapped files, which the kernel can drop and read again).
memory() {
  for m in "${NAMES[@]}"; do
    local s=/proc/${PID[$m]}/status
    [ -r "$s" ] || { printf 'dead '; continue; }
    printf '%s/%s/%s ' "$(($(awk '/^VmRSS/{print $2}' "$s") / 1024))" \
      "$(($(awk '/^VmHWM/{print $2}' "$s") / 1024))" "$(($(awk '/^RssAnon/{print $2}' "$s") / 1024))"
  done
}

# The members that are no longer running (killed by the OOM killer under MEMORY_LIMIT_MB).
dead_members() {
  for m in "${NAMES[@]}"; do kill -0 "${PID[$m]}" 2>/dev/null || printf '%s ' "$m"; done
}

stop_all() {
  for m in "${NAMES[@]}"; do kill -9 "${PID[$m]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
}

# A member that is not the leader.
follower() {
  for m in "${NAMES[@]}"; do
    local f
    f=$(etcdctl --endpoints=127.0.0.1:${PORT[$m]} endpoint status -w fields 2>/dev/null)
    local id leader
    id=$(sed -n 's/^"MemberID" : //p' <<<"$f")
    leader=$(sed -n 's/^"Leader" : //p' <<<"$f")
    [ -n "$id" ] && [ "$id" != "$leader" ] && { echo "$m"; return; }
  done
}

one_system() {
  local sys=$1
  rm -rf "${WORK:?}"/*
  for m in "${NAMES[@]}"; do start "$sys" "$m" new; done
  retry etcdctl --endpoints=$EP put warmup 1 >/dev/null
  echo "$sys: $ROUNDS rounds of $ROUND_PUTS puts of $VAL_SIZE bytes, snapshot-count $SNAPSHOT_COUNT"
  for r in $(seq 0 $((ROUNDS - 1))); do
    local before out dead
    dead=$(dead_members)
    if [ -n "$dead" ]; then
      echo "  stopped: $dead died (under MEMORY_LIMIT_MB=${MEMORY_LIMIT_MB:-none}: the OOM killer)"
      stop_all
      return
    fi
    before=$(leader_changes)
    out=$("$RAFTKV" bench put --endpoints "$EP" --total "$ROUND_PUTS" --val-size "$VAL_SIZE" \
      --key-space "$ROUND_PUTS" --first-key $((r * ROUND_PUTS)) --clients 64 --conns 8 --quiet |
      grep '^RESULT' || true)
    local ops p99 errors
    ops=$(sed -n 's/.*ops_per_sec=\([0-9]*\).*/\1/p' <<<"$out")
    p99=$(sed -n 's/.*p99_ms=\([0-9.]*\).*/\1/p' <<<"$out")
    errors=$(sed -n 's/.*errors=\([0-9]*\).*/\1/p' <<<"$out")
    printf '  round %d: %6s puts/s  p99 %8s ms  failed %6s  leader changes %s  memory MB (now/peak/anon) %s  data %s MB\n' \
      $((r + 1)) "$ops" "$p99" "$errors" $(($(leader_changes) - before)) "$(memory)" \
      "$(du -sm "$WORK" | cut -f1)"
  done
  dead=$(dead_members)
  if [ -n "$dead" ]; then
    echo "  stopped: $dead died (under MEMORY_LIMIT_MB=${MEMORY_LIMIT_MB:-none}: the OOM killer)"
    stop_all
    return
  fi
  retry etcdctl --endpoints=$EP put newest yes >/dev/null
  [ -z "${MEMORY_LIMIT_MB:-}" ] || check_reads

  local f t0
  f=$(follower)
  kill -9 "${PID[$f]}"
  wait "${PID[$f]}" 2>/dev/null || true
  t0=$(date +%s.%N)
  start "$sys" "$f" existing
  retry etcdctl --endpoints=127.0.0.1:${PORT[$f]} --command-timeout=1s get newest >/dev/null
  echo "  follower killed -9 → its first linearizable read: $(secs_since "$t0") s"

  for m in "${NAMES[@]}"; do kill -9 "${PID[$m]}"; done
  wait 2>/dev/null || true
  t0=$(date +%s.%N)
  for m in "${NAMES[@]}"; do start "$sys" "$m" existing; done
  retry etcdctl --endpoints=$EP --command-timeout=1s put after-restart 1 >/dev/null
  echo "  whole cluster killed -9 → first write: $(secs_since "$t0") s"
  retry etcdctl --endpoints=$EP --command-timeout=1s get newest >/dev/null
  echo "  memory MB (now/peak/anon) after the restart: $(memory)"
  for m in "${NAMES[@]}"; do kill -9 "${PID[$m]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
}

for sys in $SYSTEMS; do one_system "$sys"; done
