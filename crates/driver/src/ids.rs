//! Ids for requests and reads that are unique across members *and* across restarts.
//!
//! A member answers a client when it applies the entry carrying that client's request id,
//! and serves a read when a ReadIndex answer carrying the read's context arrives. Both may
//! arrive after the member restarted: an entry it proposed before a crash commits later, a
//! leader's answer to a read from its previous life is still in flight. If ids restarted
//! from 1 at every boot, such a late arrival would answer whichever new request got the same
//! id — with another command's result, or a read confirmed before the write it must see.
//! So every id carries the member's id and a boot nonce, a 64-bit value drawn afresh at
//! every start (from the OS in the server, from the seed in the simulator).

use raft::{NodeId, ReadCtx};

/// Who proposed a command, in which life, and which of its requests it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId {
    /// The member that proposed the command, and so holds the waiting client.
    pub member: NodeId,
    /// That member's boot nonce: which of its lives proposed it.
    pub boot: u64,
    /// The request's number within that life, from 1.
    pub seq: u64,
}

/// The id source of one member's life.
#[derive(Clone, Debug)]
pub struct Ids {
    member: NodeId,
    boot: u64,
    next_seq: u64,
    next_read: ReadCtx,
}

impl Ids {
    /// `boot` must differ between the lives of a member (random is right; a clock is not:
    /// clocks go back).
    pub fn new(member: NodeId, boot: u64) -> Ids {
        Ids {
            member,
            boot,
            next_seq: 1,
            // Read contexts are a single u64 on the wire, so they start at a point drawn
            // from the boot nonce: a late answer from an earlier life lands in another range.
            next_read: mix(boot ^ member.rotate_left(29)),
        }
    }

    /// The boot nonce this life's ids carry.
    pub fn boot(&self) -> u64 {
        self.boot
    }

    /// A request id this member never handed out before: not in this life, and not in an
    /// earlier one, since each life has its own boot nonce.
    pub fn next_request(&mut self) -> RequestId {
        let seq = self.next_seq;
        self.next_seq += 1;
        RequestId {
            member: self.member,
            boot: self.boot,
            seq,
        }
    }

    /// A context for [`raft::Raft::read_index`], from a range that depends on the boot
    /// nonce, so that a late ReadIndex answer meant for an earlier life matches no read of
    /// this one.
    pub fn next_read(&mut self) -> ReadCtx {
        let ctx = self.next_read;
        self.next_read = self.next_read.wrapping_add(1);
        ctx
    }
}

/// A bijective 64-bit mixer (splitmix64's finalizer): nearby nonces give distant starts.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_of_two_lives_never_collide() {
        let (mut a, mut b) = (Ids::new(7, 1), Ids::new(7, 2));
        let first: Vec<_> = (0..1000).map(|_| a.next_request()).collect();
        let second: Vec<_> = (0..1000).map(|_| b.next_request()).collect();
        assert!(first.iter().all(|x| !second.contains(x)));
        let reads_a: Vec<_> = (0..1000).map(|_| a.next_read()).collect();
        let reads_b: Vec<_> = (0..1000).map(|_| b.next_read()).collect();
        assert!(reads_a.iter().all(|x| !reads_b.contains(x)));
    }
}
