# Shared by bench/scale.sh and bench/catch-up.sh (sourced, from the repository's root).

# RAFTKV: the build to measure — $RAFTKV_BIN if set, else a release build of this tree.
if [ -n "${RAFTKV_BIN:-}" ]; then
  RAFTKV="$RAFTKV_BIN"
else
  cargo build -q --release -p raftkv
  RAFTKV="$PWD/target/release/raftkv"
fi

# The tools both scripts drive, and etcd itself when $SYSTEMS names it.
for tool in etcdctl bc curl; do
  command -v $tool >/dev/null || { echo "needs $tool (Debian: etcd-client, bc, curl)"; exit 1; }
done
[[ $SYSTEMS != *etcd* ]] || command -v etcd >/dev/null || { echo "needs etcd (Debian: etcd-server)"; exit 1; }

export ETCDCTL_API=3

# What etcdctl is asked right after a leader change may be refused: ask again (30 s at most).
retry() { for _ in $(seq 1 300); do "$@" 2>/dev/null && return 0; sleep 0.1; done; return 1; }

# limit_memory PID MB: confine a running process to MB megabytes of memory, page cache
# included, in a cgroup of its own (cgroup v2, or v1's memory controller). The kernel then
# reclaims the process's file pages (and kills it if what it cannot drop exceeds MB).
limit_memory() {
  local pid=$1 mb=$2 dir
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    dir=/sys/fs/cgroup/raftkv-bench-$pid
    mkdir -p "$dir" && echo $((mb << 20)) >"$dir/memory.max"
  else
    dir=/sys/fs/cgroup/memory/raftkv-bench-$pid
    mkdir -p "$dir" && echo $((mb << 20)) >"$dir/memory.limit_in_bytes"
  fi || { echo "cannot make a memory cgroup (run as root on a cgroup v1 or v2 machine)"; exit 1; }
  echo "$pid" >"$dir/cgroup.procs"
}

# The cgroups limit_memory made, removed once their processes are gone.
unlimit_all() {
  rmdir /sys/fs/cgroup/raftkv-bench-* /sys/fs/cgroup/memory/raftkv-bench-* 2>/dev/null || true
}
