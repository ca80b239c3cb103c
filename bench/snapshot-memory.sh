#!/usr/bin/env bash
# What slow backup readers cost a member: one member with ~200 MB of values (50,000 puts of
# 4 KiB), then four `etcdctl snapshot save` whose output nobody reads (each writes into a
# FIFO held open by a reader that never reads), and the member's resident set before and
# while they hang; then a fifth Snapshot and a HashKV, which the bounds decide.
#
#   bench/snapshot-memory.sh                         # builds and measures this checkout
#   RAFTKV_BIN=/path/to/raftkv bench/snapshot-memory.sh   # a given build (before/after)
#
# Needs etcdctl (Debian package etcd-client). Ports 26379-26380 on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${RAFTKV_BIN:-}" ]; then
  BIN="$RAFTKV_BIN"
else
  cargo build -q --release -p raftkv
  BIN="$PWD/target/release/raftkv"
fi
PORT=${PORT:-26379}
D=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$D"; }
trap cleanup EXIT
"$BIN" serve --name a --data-dir "$D/a" \
  --listen-client-urls "http://127.0.0.1:$PORT" --advertise-client-urls "http://127.0.0.1:$PORT" \
  --listen-peer-urls "http://127.0.0.1:$((PORT + 1))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((PORT + 1))" \
  --initial-cluster "a=http://127.0.0.1:$((PORT + 1))" \
  --quota-backend-bytes 8589934592 --snapshot-count 100000 >"$D/log" 2>&1 &
MEMBER=$!
PIDS+=("$MEMBER")
for _ in $(seq 100); do
  ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$PORT" put ready yes >/dev/null 2>&1 && break
  sleep 0.1
done
"$BIN" bench put --endpoints "127.0.0.1:$PORT" --clients 32 --conns 4 --total 50000 \
  --val-size 4096 --key-space 50000 --quiet >/dev/null
rss() { awk '/VmRSS/ { print int($2 / 1024) }' "/proc/$MEMBER/status"; }
echo "resident after the load: $(rss) MiB"
for i in 1 2 3 4; do
  # etcdctl writes into <path>.part: a FIFO there whose reader never reads stalls it.
  mkfifo "$D/s$i.part"
  sleep 30 <"$D/s$i.part" &
  PIDS+=("$!")
  ETCDCTL_API=3 timeout 25 etcdctl --endpoints "127.0.0.1:$PORT" --command-timeout 25s \
    snapshot save "$D/s$i" >"$D/ctl$i.log" 2>&1 &
  PIDS+=("$!")
done
sleep 12
echo "resident with 4 backups nobody reads: $(rss) MiB"
echo "a fifth snapshot: $(ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$PORT" snapshot save "$D/s5" 2>&1 | tail -1)"
echo "hashkv meanwhile: $(ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$PORT" endpoint hashkv 2>&1 | tail -1)"
