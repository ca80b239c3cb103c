//! A linearizability checker for histories of single-key operations on a key-value store.
//!
//! A history is linearizable if every operation can be given a single instant between its
//! invocation and its response such that, taken in that order, the operations are a legal
//! sequential run of the store (Herlihy & Wing). The search is Wing & Gong's, with Lowe's
//! refinement and a cache of visited (set of linearized operations, model state) pairs as
//! Porcupine does: walk the invocations and responses in time order; at an invocation, try
//! to linearize that operation now (if the model accepts its output) and go on; at a
//! response of an operation not yet linearized, this branch is dead: undo the last choice.
//!
//! Keys are independent (every operation touches one key), so each key is checked on its
//! own, which keeps the search small.
//!
//! An operation whose client never learned the outcome (`ret: None`: timed out, connection
//! lost, member crashed) may have taken effect at any moment after its invocation, or never.
//! It is given a response at the end of time and any output: linearizing it last, after
//! everything observable, is the same as it never having happened.

use std::collections::HashSet;
use std::fmt::Write as _;

pub type Key = u64;
pub type Value = u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Put(Value),
    Get,
    Delete,
    /// If the key's value is `expect` (`None`: the key is absent), set it to `new`.
    Cas {
        expect: Option<Value>,
        new: Value,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// A put or delete was done.
    Ok,
    /// What a get saw.
    Value(Option<Value>),
    /// Whether a compare-and-swap swapped.
    Cas(bool),
}

#[derive(Clone, Debug)]
pub struct Operation {
    pub client: u64,
    pub key: Key,
    pub input: Input,
    /// Virtual time the request was issued.
    pub call: u64,
    /// Virtual time the response arrived; `None`: the client never learned the outcome.
    pub ret: Option<u64>,
    /// Ignored when `ret` is `None`.
    pub output: Output,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// The first key found with no legal order, and its history, readably.
    Violation(String),
    /// The search for some key needed more than `budget` steps.
    Inconclusive,
}

/// Check `history`, spending at most `budget` search steps on each key.
pub fn check(history: &[Operation], budget: u64) -> Verdict {
    let mut keys: Vec<Key> = history.iter().map(|o| o.key).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut inconclusive = false;
    for key in keys {
        // A read whose answer never arrived constrains nothing.
        let ops: Vec<&Operation> = history
            .iter()
            .filter(|o| o.key == key && !(o.ret.is_none() && o.input == Input::Get))
            .collect();
        match search(&ops, budget) {
            Some(true) => {}
            Some(false) => return Verdict::Violation(describe(key, &ops)),
            None => inconclusive = true,
        }
    }
    if inconclusive {
        Verdict::Inconclusive
    } else {
        Verdict::Linearizable
    }
}

/// The sequential model: apply `op` to `state`. Returns the new state if the operation's
/// recorded output is what the model gives (any output, for an unknown outcome).
fn step(state: Option<Value>, op: &Operation) -> Option<Option<Value>> {
    let known = op.ret.is_some();
    let (next, out) = match op.input {
        Input::Put(v) => (Some(v), Output::Ok),
        Input::Delete => (None, Output::Ok),
        Input::Get => (state, Output::Value(state)),
        Input::Cas { expect, new } => {
            let swap = state == expect;
            (if swap { Some(new) } else { state }, Output::Cas(swap))
        }
    };
    (!known || out == op.output).then_some(next)
}

/// One invocation or response in the time-ordered list the search walks.
#[derive(Clone, Copy)]
struct Event {
    op: usize,
    call: bool,
}

/// Lowe's search over one key's operations. `Some(verdict)`, or `None` past the budget.
fn search(ops: &[&Operation], budget: u64) -> Option<bool> {
    let n = ops.len();
    if n == 0 {
        return Some(true);
    }
    // Doubled time: a response at the instant of another's invocation came first (the
    // simulator answers during events and invokes between them), but an operation answered
    // the instant it was invoked still returns after its own call.
    let ret_time = |o: &Operation| match o.ret {
        None => u64::MAX,
        Some(r) if r == o.call => 2 * r + 1,
        Some(r) => 2 * r,
    };
    let mut events: Vec<(u64, u8, Event)> = Vec::with_capacity(2 * n);
    for (i, o) in ops.iter().enumerate() {
        events.push((2 * o.call, 1, Event { op: i, call: true }));
        events.push((ret_time(o), 0, Event { op: i, call: false }));
    }
    events.sort_by_key(|&(t, kind, e)| (t, kind, e.op));
    // A doubly linked list over the events, with a head sentinel at index `len`.
    let len = events.len();
    let head = len;
    // Event i links to i - 1 and i + 1; the sentinel closes the ring (len > 0 here).
    let mut next: Vec<usize> = (1..=len).collect();
    next.push(0);
    let mut prev: Vec<usize> = (0..=len).map(|i| i.wrapping_sub(1)).collect();
    prev[0] = head;
    prev[head] = len - 1;
    let mut call_at = vec![0; n];
    let mut ret_at = vec![0; n];
    for (i, &(_, _, e)) in events.iter().enumerate() {
        if e.call {
            call_at[e.op] = i;
        } else {
            ret_at[e.op] = i;
        }
    }
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, i: usize| {
        let (p, q) = (prev[i], next[i]);
        next[p] = q;
        prev[q] = p;
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, i: usize| {
        let (p, q) = (prev[i], next[i]);
        next[p] = i;
        prev[q] = i;
    };

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, Option<Value>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<Value>)> = Vec::new();
    let mut state: Option<Value> = None;
    let mut cursor = next[head];
    let mut steps = 0u64;
    while next[head] != head {
        steps += 1;
        if steps > budget {
            return None;
        }
        // At an invocation, try to linearize that operation now.
        if cursor != head && events[cursor].2.call {
            let op = events[cursor].2.op;
            if let Some(after) = step(state, ops[op]) {
                let mut set = linearized.clone();
                set[op / 64] |= 1 << (op % 64);
                if cache.insert((set.clone(), after)) {
                    stack.push((op, state));
                    state = after;
                    linearized = set;
                    unlink(&mut next, &mut prev, call_at[op]);
                    unlink(&mut next, &mut prev, ret_at[op]);
                    cursor = next[head];
                    continue;
                }
            }
            cursor = next[cursor];
            continue;
        }
        // At the response of an operation not yet linearized (or, unreachably, past the
        // end): this branch is dead, undo the last choice and try the next one after it.
        let Some((op, before)) = stack.pop() else {
            return Some(false);
        };
        state = before;
        linearized[op / 64] &= !(1 << (op % 64));
        relink(&mut next, &mut prev, ret_at[op]);
        relink(&mut next, &mut prev, call_at[op]);
        cursor = next[call_at[op]];
    }
    Some(true)
}

fn describe(key: Key, ops: &[&Operation]) -> String {
    let mut sorted: Vec<&&Operation> = ops.iter().collect();
    sorted.sort_by_key(|o| (o.call, o.ret));
    let mut out = format!("key {key}: no order of these operations is legal\n");
    for o in sorted {
        let ret = o.ret.map_or("never".to_string(), |r| r.to_string());
        let output = if o.ret.is_some() {
            format!("{:?}", o.output)
        } else {
            "unknown".to_string()
        };
        let _ = writeln!(
            out,
            "  client {:>3}  call {:>10}  ret {:>10}  {:?} -> {}",
            o.client, o.call, ret, o.input, output
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn op(client: u64, input: Input, call: u64, ret: Option<u64>, output: Output) -> Operation {
        Operation {
            client,
            key: 0,
            input,
            call,
            ret,
            output,
        }
    }
    fn put(c: u64, v: u64, call: u64, ret: u64) -> Operation {
        op(c, Input::Put(v), call, Some(ret), Output::Ok)
    }
    fn get(c: u64, v: Option<u64>, call: u64, ret: u64) -> Operation {
        op(c, Input::Get, call, Some(ret), Output::Value(v))
    }
    fn ok(h: &[Operation]) -> bool {
        check(h, 1_000_000) == Verdict::Linearizable
    }

    #[test]
    fn sequential_histories_follow_the_model() {
        assert!(ok(&[
            put(1, 1, 0, 1),
            get(1, Some(1), 2, 3),
            op(1, Input::Delete, 4, Some(5), Output::Ok),
            get(1, None, 6, 7),
        ]));
        assert!(!ok(&[put(1, 1, 0, 1), get(1, Some(9), 2, 3)]));
        assert!(!ok(&[
            op(1, Input::Delete, 0, Some(1), Output::Ok),
            get(1, Some(0), 2, 3)
        ]));
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_caught() {
        let h = [put(1, 1, 0, 1), put(1, 2, 2, 3), get(2, Some(1), 4, 5)];
        match check(&h, 1_000) {
            Verdict::Violation(why) => assert!(why.contains("key 0"), "{why}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_read_concurrent_with_a_write_may_see_either_value() {
        for seen in [Some(1), Some(2)] {
            assert!(ok(&[put(1, 1, 0, 1), put(1, 2, 2, 10), get(2, seen, 3, 5)]));
        }
        // ...but not one that was never written.
        assert!(!ok(&[
            put(1, 1, 0, 1),
            put(1, 2, 2, 10),
            get(2, Some(3), 3, 5)
        ]));
    }

    #[test]
    fn an_operation_of_unknown_outcome_may_or_may_not_have_happened() {
        let lost = op(1, Input::Put(7), 0, None, Output::Ok);
        assert!(ok(&[lost.clone(), get(2, Some(7), 5, 6)]));
        assert!(ok(&[lost.clone(), get(2, None, 5, 6)]));
        // It cannot take effect before it was issued.
        let late = op(1, Input::Put(7), 10, None, Output::Ok);
        assert!(!ok(&[late, get(2, Some(7), 5, 6)]));
        // Once seen it stays: seen, then gone without a delete, is illegal.
        assert!(!ok(&[lost, get(2, Some(7), 5, 6), get(2, None, 7, 8)]));
    }

    #[test]
    fn two_successful_swaps_from_the_same_value_are_illegal() {
        let cas = |c, new, call, ret| {
            op(
                c,
                Input::Cas {
                    expect: Some(1),
                    new,
                },
                call,
                Some(ret),
                Output::Cas(true),
            )
        };
        assert!(!ok(&[put(1, 1, 0, 1), cas(1, 2, 2, 3), cas(2, 3, 4, 5)]));
        // One of them failing is fine.
        let mut failed = cas(2, 3, 4, 5);
        failed.output = Output::Cas(false);
        assert!(ok(&[put(1, 1, 0, 1), cas(1, 2, 2, 3), failed]));
        // A swap from "absent" works on an absent key only.
        let create = op(
            3,
            Input::Cas {
                expect: None,
                new: 5,
            },
            6,
            Some(7),
            Output::Cas(true),
        );
        assert!(!ok(&[put(1, 1, 0, 1), create.clone()]));
        assert!(ok(&[create, get(1, Some(5), 8, 9)]));
    }

    #[test]
    fn keys_are_independent() {
        let mut other = get(2, Some(1), 2, 3);
        other.key = 1;
        assert!(!ok(&[put(1, 1, 0, 1), other.clone()]));
        let mut w = put(1, 1, 0, 1);
        w.key = 1;
        assert!(ok(&[put(1, 2, 0, 1), w, other]));
    }

    #[test]
    fn an_exhausted_budget_is_inconclusive_not_a_verdict() {
        let h: Vec<Operation> = (0..20).map(|i| put(i, i, 0, 100)).collect();
        assert_eq!(check(&h, 1), Verdict::Inconclusive);
        assert_eq!(check(&h, 1_000_000), Verdict::Linearizable);
    }

    /// The definition, checked the slow way: some subset of the operations that contains
    /// every answered one has an order that respects real time (an operation answered
    /// before another was called comes first) and that the model accepts.
    fn brute_force(h: &[Operation]) -> bool {
        let n = h.len();
        let must: u32 = (0..n)
            .filter(|&i| h[i].ret.is_some())
            .fold(0, |m, i| m | 1 << i);
        let before = |a: &Operation, b: &Operation| a.ret.is_some_and(|r| r < b.call);
        // Depth-first over orders: extend with any operation none of whose real-time
        // predecessors is still missing.
        fn go(
            h: &[Operation],
            used: u32,
            state: Option<Value>,
            must: u32,
            before: &dyn Fn(&Operation, &Operation) -> bool,
        ) -> bool {
            if used & must == must {
                return true;
            }
            (0..h.len()).any(|i| {
                let free = used & (1 << i) == 0
                    && (0..h.len())
                        .all(|j| used & (1 << j) != 0 || j == i || !before(&h[j], &h[i]));
                free && step(state, &h[i])
                    .is_some_and(|next| go(h, used | 1 << i, next, must, before))
            })
        }
        go(h, 0, None, must, &before)
    }

    /// The search agrees with the definition on thousands of small random histories, some
    /// linearizable and most not, with operations of unknown outcome among them.
    #[test]
    fn agrees_with_brute_force_on_small_histories() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (mut yes, mut no) = (0, 0);
        for _ in 0..20_000 {
            let n = rng.gen_range(1..7);
            let h: Vec<Operation> = (0..n)
                .map(|i| {
                    let call = rng.gen_range(0..10);
                    let ret = rng.gen_bool(0.8).then(|| call + rng.gen_range(0..6));
                    let v = |rng: &mut ChaCha8Rng| rng.gen_range(1..4);
                    let (input, output) = match rng.gen_range(0..4) {
                        0 => (Input::Put(v(&mut rng)), Output::Ok),
                        1 => (Input::Delete, Output::Ok),
                        2 => (
                            Input::Get,
                            Output::Value(rng.gen_bool(0.7).then(|| v(&mut rng))),
                        ),
                        _ => {
                            let expect = rng.gen_bool(0.7).then(|| v(&mut rng));
                            let new = v(&mut rng);
                            (Input::Cas { expect, new }, Output::Cas(rng.gen()))
                        }
                    };
                    Operation {
                        client: i,
                        key: 0,
                        input,
                        call,
                        ret,
                        output,
                    }
                })
                .collect();
            // The search reads unanswered gets as constraining nothing; so does this.
            let h: Vec<Operation> = h
                .into_iter()
                .filter(|o| !(o.ret.is_none() && o.input == Input::Get))
                .collect();
            // The search orders an operation answered at the instant another is called
            // before it; the brute force needs strict inequality, so avoid the tie.
            let tie = h
                .iter()
                .any(|a| h.iter().any(|b| a.ret == Some(b.call) && a.call != b.call));
            if tie {
                continue;
            }
            let expected = brute_force(&h);
            let got = check(&h, 1_000_000);
            assert_eq!(got == Verdict::Linearizable, expected, "{h:#?}");
            if expected {
                yes += 1;
            } else {
                no += 1;
            }
        }
        assert!(yes > 1_000 && no > 1_000, "{yes} linearizable, {no} not");
    }

    /// Random concurrent histories produced by a real sequential execution are always
    /// accepted; corrupting one read to a value nobody wrote is always caught.
    #[test]
    fn random_real_executions_pass_and_corrupted_ones_fail() {
        for seed in 0..200 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut state = [None::<u64>; 3];
            let mut h = Vec::new();
            let mut now = 0u64;
            for i in 0..60u64 {
                // Each operation takes effect at `now`; its interval straddles that point.
                now += rng.gen_range(1..5);
                let key = rng.gen_range(0..3u64);
                let s = &mut state[key as usize];
                let (input, output) = match rng.gen_range(0..4) {
                    0 => (Input::Put(i + 1), Output::Ok),
                    1 => (Input::Get, Output::Value(*s)),
                    2 => (Input::Delete, Output::Ok),
                    _ => {
                        let expect = if rng.gen_bool(0.5) { *s } else { Some(999) };
                        (Input::Cas { expect, new: i + 1 }, Output::Cas(*s == expect))
                    }
                };
                match input {
                    Input::Put(v) => *s = Some(v),
                    Input::Delete => *s = None,
                    Input::Cas { expect, new } if *s == expect => *s = Some(new),
                    _ => {}
                }
                let call = now.saturating_sub(rng.gen_range(0..8));
                let lost = rng.gen_ratio(1, 15) && !matches!(input, Input::Get);
                let ret = (!lost).then(|| now + rng.gen_range(0..8));
                h.push(Operation {
                    client: i % 5,
                    key,
                    input,
                    call,
                    ret,
                    output,
                });
            }
            assert_eq!(check(&h, 10_000_000), Verdict::Linearizable, "seed {seed}");
            let reads: Vec<usize> = (0..h.len())
                .filter(|&i| h[i].input == Input::Get && h[i].ret.is_some())
                .collect();
            if let Some(&r) = reads.get(rng.gen_range(0..reads.len().max(1))) {
                h[r].output = Output::Value(Some(12_345));
                assert!(
                    matches!(check(&h, 10_000_000), Verdict::Violation(_)),
                    "seed {seed}: a read of a value never written passed"
                );
            }
        }
    }
}
