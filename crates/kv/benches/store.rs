//! What the raft loop pays for the store: applying puts, and freezing the store for a
//! background snapshot. `cargo bench -p kv --bench store` prints medians of 5 runs.

use bytes::Bytes;
use kv::{PutRequest, Request, Store};
use std::time::{Duration, Instant};

const KEYS: u64 = 100_000;

fn put(i: u64) -> Request {
    Request::Put(PutRequest {
        key: Bytes::from(format!("key-{:08}", i % KEYS)),
        value: Bytes::from(vec![b'v'; 256]),
        ..Default::default()
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mut applies = Vec::new();
    let mut freezes = Vec::new();
    let mut writes_after = Vec::new();
    for _ in 0..5 {
        let mut store = Store::new();
        let t = Instant::now();
        for i in 0..2 * KEYS {
            store.apply(&put(i)).unwrap();
        }
        applies.push(t.elapsed() / (2 * KEYS as u32));
        let t = Instant::now();
        let frozen = store.clone();
        freezes.push(t.elapsed());
        // Writes while the frozen copy is alive copy what they touch.
        let t = Instant::now();
        for i in 0..KEYS {
            store.apply(&put(i * 7)).unwrap();
        }
        writes_after.push(t.elapsed() / KEYS as u32);
        drop(frozen);
    }
    println!("{KEYS} keys, 256 B values (medians of 5 runs):");
    println!("  apply one put:                    {:?}", median(applies));
    println!("  freeze the store for a snapshot:  {:?}", median(freezes));
    println!(
        "  apply one put while frozen:       {:?}",
        median(writes_after)
    );
}
