//! Lease requests fixed in advance, near the edges of etcd's rules, each answered as etcd
//! answers it.

use crate::generate::{Model, NO_LEASE};
use crate::requests::*;
use crate::run::both_kv;
use crate::side::sides;
use crate::support::Timing;

/// Lease requests near the edges of etcd's rules, each answered as etcd answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_lease_requests_answer_as_etcds_do() {
    let (mut etcd, mut raftkv, e0) = sides(1).await;
    let grant = |id, ttl| Req::LeaseGrant { m: 0, id, ttl };
    let revoke = |id| Req::LeaseRevoke { m: 0, id };
    let ttl = |id, keys| Req::LeaseTtl { m: 0, id, keys };
    let put_on = |key: &str, lease: i64, ignore_lease: bool| Req::Put {
        m: 0,
        key: key.into(),
        value: if ignore_lease { "kept" } else { "v" }.into(),
        prev_kv: true,
        ignore_value: false,
        lease,
        ignore_lease,
    };
    let on_lease = |key: &str, lease: i64| Cmp {
        span: one(key),
        target: Target::Lease(lease),
        op: 0,
    };
    let all = || Req::Get {
        m: 0,
        span: span("\0", &[0]),
        opts: RangeOpts::default(),
    };
    let reqs = vec![
        grant(1, 600),
        grant(1, 700),
        grant(2, 9_000_000_000),
        grant(3, 9_000_000_001),
        grant(3, i64::MAX),
        grant(-1, 600),
        grant(i64::MAX, 600),
        put_on("a", 1, false),
        put_on("b", 1, false),
        put_on("c", 2, false),
        put_on("n", -1, false),
        put_on("d", NO_LEASE, false),
        // ignore_lease: the key keeps its lease; refused with a lease, or for no key.
        put_on("a", 0, true),
        put_on("a", 1, true),
        put_on("missing", 0, true),
        // A lease compare, and transactions putting with leases.
        txn(
            vec![on_lease("a", 1)],
            vec![TOp::Put("e".into(), "1".into(), true, 2)],
            vec![],
        ),
        txn(
            vec![on_lease("missing", 0), on_lease("c", 1)],
            vec![],
            vec![TOp::Put("c".into(), "moved".into(), true, 1)],
        ),
        txn(
            vec![],
            vec![
                TOp::Put("f".into(), "1".into(), false, 1),
                TOp::Put("g".into(), "1".into(), false, NO_LEASE),
            ],
            vec![],
        ),
        // A missing lease in the branch not taken.
        txn(
            vec![on_lease("a", 1)],
            vec![TOp::Put("h".into(), "1".into(), false, 2)],
            vec![TOp::Put("h".into(), "1".into(), false, NO_LEASE)],
        ),
        // A put without a lease takes the key off its lease.
        put_on("e", 0, false),
        ttl(1, true),
        ttl(2, true),
        ttl(-1, true),
        ttl(NO_LEASE, true),
        ttl(NO_LEASE, false),
        Req::LeaseLeases { m: 0 },
        Req::LeaseKeepAlive { m: 0, id: 1 },
        Req::LeaseKeepAlive { m: 0, id: NO_LEASE },
        // Revoked: its keys go at one revision; a lease without keys goes without one.
        revoke(1),
        all(),
        revoke(1),
        revoke(NO_LEASE),
        revoke(i64::MAX),
        ttl(1, true),
        put_on("a", 1, false),
        Req::LeaseKeepAlive { m: 0, id: 1 },
        Req::LeaseLeases { m: 0 },
        all(),
    ];
    let mut diffs = Vec::new();
    let mut m = Model::new(e0, false);
    for (i, req) in reqs.iter().enumerate() {
        if let Err(d) = both_kv(&mut etcd, &mut raftkv, req, i, &mut m).await {
            diffs.push(d);
        }
    }
    // Last, as nothing after them may depend on time: TTLs at and below etcd's minimum
    // (a second, with these election timeouts) get the minimum.
    assert_eq!(Timing::QUICK.min_lease_ttl(), 1);
    for (i, req) in [grant(10, 1), grant(11, 0), grant(12, -5), grant(13, 2)]
        .iter()
        .enumerate()
    {
        if let Err(d) = both_kv(&mut etcd, &mut raftkv, req, reqs.len() + i, &mut m).await {
            diffs.push(d);
        }
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}
