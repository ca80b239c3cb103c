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
