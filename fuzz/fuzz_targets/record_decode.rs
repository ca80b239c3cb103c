//! The WAL record decoder must never panic, whatever the bytes, and anything it accepts
//! must re-encode to exactly the bytes it consumed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use storage::record::{decode, encode, Decoded};

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while at < data.len() {
        match decode(&data[at..]) {
            Decoded::Record(rec, len) => {
                let mut again = Vec::new();
                encode(&rec, &mut again);
                assert_eq!(&again[..], &data[at..at + len]);
                at += len;
            }
            _ => break,
        }
    }
});
