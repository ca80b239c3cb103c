//! Real `raftkv serve` processes under faults from outside: a network partition (TCP proxies
//! on the peer links that the test cuts), a corrupted data directory, and requests that are
//! malformed or too large.

mod common;

use bytes::{Buf, BufMut, Bytes};
use common::*;
use server::pb::etcdserverpb::{PutRequest, RangeRequest};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

/// A TCP proxy to `target` that can be cut: a cut drops every open connection and refuses
/// new ones, as a partitioned network would.
struct Proxy {
    cut: watch::Sender<bool>,
}

impl Proxy {
    /// Forward connections accepted on 127.0.0.1:`port` to `target` (host:port).
    async fn start(port: u16, target: String) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let (cut, watch) = watch::channel(false);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if *watch.borrow() {
                    continue; // dropped: the connection is reset
                }
                let mut watch = watch.clone();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watch.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Proxy { cut }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

fn key_value(k: &str, v: &str) -> PutRequest {
    PutRequest {
        key: Bytes::copy_from_slice(k.as_bytes()),
        value: Bytes::copy_from_slice(v.as_bytes()),
        ..Default::default()
    }
}

async fn serializable_get(url: &str, key: &str) -> Option<Bytes> {
    let req = RangeRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        serializable: true,
        ..Default::default()
    };
    let r = kv(url).await.range(req).await.unwrap().into_inner();
    r.kvs.into_iter().next().map(|kv| kv.value)
}

async fn wait_for(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_side_cannot_commit_and_never_serves_a_stale_linearizable_read() {
    let dir = tempfile::tempdir().unwrap();
    // Every link to and from n2 runs through a proxy of its own: n2 is told to reach the
    // others, and they to reach n2, at a proxy port that forwards to the real one.
    let links = std::sync::Mutex::new(Vec::new());
    let procs = start_with(dir.path(), |viewer, member, real_url| {
        if viewer != 2 && member != 2 {
            return real_url.to_string();
        }
        let port = free_port();
        let target = real_url.trim_start_matches("http://").to_string();
        links.lock().unwrap().push((port, target));
        format!("http://127.0.0.1:{port}")
    });
    // The members retry their peers with backoff until the proxies listen.
    let mut proxies = Vec::new();
    for (port, target) in links.into_inner().unwrap() {
        proxies.push(Proxy::start(port, target).await);
    }
    let (n2, majority) = (&procs[2], &procs[..2]);
    put_any(&procs, "k", "before").await;
    wait_for("n2 to apply the first write", async || {
        serializable_get(&n2.client, "k").await == Some(Bytes::from("before"))
    })
    .await;

    for p in &proxies {
        p.set_cut(true);
    }
    // The majority side goes on (electing a new leader if n2 led).
    put_any(majority, "k", "after").await;
    // n2 still holds the old value locally, so a stale answer is possible in principle...
    assert_eq!(
        serializable_get(&n2.client, "k").await,
        Some(Bytes::from("before"))
    );
    // ...but neither a linearizable read nor a write succeeds there.
    let read = async {
        let req = RangeRequest {
            key: Bytes::from("k"),
            ..Default::default()
        };
        kv(&n2.client).await.range(req).await
    };
    let write = async { kv(&n2.client).await.put(key_value("k", "minority")).await };
    let (read, write) = tokio::join!(read, write);
    let read = read.expect_err("a linearizable read on the minority side succeeded");
    assert_eq!(read.code(), Code::Unavailable, "{read:?}");
    let write = write.expect_err("a write on the minority side succeeded");
    assert_eq!(write.code(), Code::Unavailable, "{write:?}");

    // Healed, n2 catches up and serves the new value linearizably; its write never happened.
    for p in &proxies {
        p.set_cut(false);
    }
    wait_for("n2 to catch up", async || {
        get(&n2.client, "k").await.ok().flatten() == Some(Bytes::from("after"))
    })
    .await;
    for p in majority {
        assert_eq!(
            get(&p.client, "k").await.unwrap(),
            Some(Bytes::from("after"))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_data_directory_refuses_to_start_and_names_the_damage() {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = start(dir.path());
    for i in 0..20 {
        put_any(&procs, &format!("k{i}"), &"v".repeat(100)).await;
    }
    procs[0].kill();
    // Flip one byte in the middle of n0's log: not a torn tail, real damage.
    let wal = dir.path().join("n0").join("wal");
    let segment = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "wal"))
        .expect("a WAL segment");
    let mut bytes = std::fs::read(&segment).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&segment, &bytes).unwrap();

    let args: Vec<&str> = procs[0].args.iter().map(String::as_str).collect();
    let (code, err) = run(&args);
    assert_ne!(code, 0, "started on a corrupted log");
    let name = segment.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        err.contains(&name) && err.contains("corrupt data at byte offset"),
        "{err}"
    );
    // The others go on without it.
    put_any(&procs[1..], "after", "damage").await;
}

/// Sends raw bytes as a request body, to hand the server what no generated client would.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let v = src.chunk().to_vec();
        src.advance(v.len());
        Ok(Some(v))
    }
}

async fn raw_call(url: &str, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    grpc.unary(tonic::Request::new(body), path, Raw)
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_get_clear_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let procs = start(dir.path());
    put_any(&procs, "k", "v").await;
    for p in &procs {
        // Not protobuf at all: a field header announcing more bytes than follow.
        let garbage = vec![0x0a, 0xff, 0xff, 0xff, 0x0f, 1, 2, 3];
        let e = raw_call(&p.client, "/etcdserverpb.KV/Put", garbage)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Internal, "{e:?}");
        assert!(e.message().contains("decode"), "{e:?}");
        // Valid protobuf, but over etcd's request limit (1.5 MiB).
        let mut c = kv(&p.client).await;
        let e = c
            .put(key_value("big", &"x".repeat(2 << 20)))
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (Code::InvalidArgument, "etcdserver: request is too large")
        );
        // Bigger than any gRPC message the server accepts.
        let e = c
            .put(key_value("huge", &"x".repeat(5 << 20)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
        // An empty key, as etcd refuses it.
        let e = c.put(key_value("", "v")).await.unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (Code::InvalidArgument, "etcdserver: key is not provided")
        );
    }
    // Nothing was written, nobody crashed, and the cluster still works.
    for p in &procs {
        assert_eq!(get(&p.client, "big").await.unwrap(), None);
        assert_eq!(get(&p.client, "k").await.unwrap(), Some(Bytes::from("v")));
    }
    put_any(&procs, "k", "still works").await;
}

// How `raftkv serve` derives member and cluster ids from the token and names (pinned in
// its own unit test).
use server::member::bootstrap::fnv;

/// A peer stream speaks for the member its hello names: a message on it claiming another
/// sender closes the stream (PermissionDenied), while one from the named member is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_stream_carrying_another_members_message_is_closed() {
    use server::pb::raftkvpb::{self as rpb, raft_client::RaftClient};
    let dir = tempfile::tempdir().unwrap();
    let procs = common::start(dir.path());
    let peer_url = procs[0]
        .args
        .iter()
        .find_map(|a| a.strip_prefix("--listen-peer-urls="))
        .unwrap()
        .to_string();
    let cluster_id = fnv(&["test", "n0", "n1", "n2"]);
    let (n0, n1, n2) = (
        fnv(&["test", "n0"]),
        fnv(&["test", "n1"]),
        fnv(&["test", "n2"]),
    );
    let frame = |from: u64| rpb::MessageBatch {
        messages: vec![rpb::Message {
            from,
            to: n0,
            term: 0,
            body: Some(rpb::message::Body::HeartbeatResponse(
                rpb::HeartbeatResponse { seq: 0 },
            )),
        }],
        hello: Some(rpb::Hello {
            cluster_id,
            member_id: n1,
            client_urls: vec![],
            peer_urls: vec![],
        }),
    };
    let mut client = None;
    for _ in 0..100 {
        if let Ok(c) = RaftClient::connect(peer_url.clone()).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = client.expect("the member's peer port answers");
    let honest = client.stream(tokio_stream::iter(vec![frame(n1)])).await;
    assert!(
        honest.is_ok(),
        "a stream that keeps to its member is taken: {honest:?}"
    );
    let forged = client.stream(tokio_stream::iter(vec![frame(n2)])).await;
    let err = forged.expect_err("a message from another member closes the stream");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("belongs to member"), "{err:?}");
    // The member is unharmed.
    common::put_any(&procs, "after", "impostor").await;
}
