//! Requests and responses of the store, with etcd v3's meanings (`etcdserverpb` and
//! `mvccpb`). The server maps the protobuf messages onto these one to one.

use bytes::Bytes;

/// The main revision: bumped once by every transaction that writes.
pub type Revision = i64;

/// `mvccpb.KeyValue`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Bytes,
    /// Revision of the key's creation (of its current generation).
    pub create_revision: Revision,
    /// Revision of its last modification.
    pub mod_revision: Revision,
    /// Number of modifications since creation; a delete resets it to 0.
    pub version: i64,
    pub value: Bytes,
    pub lease: i64,
}

/// A key range, etcd-style: an empty `range_end` means the single key `key`; `range_end ==
/// "\0"` means every key `>= key`; otherwise `[key, range_end)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyRange {
    pub key: Bytes,
    pub range_end: Bytes,
}

impl KeyRange {
    /// Whether `key` falls in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        if self.range_end.is_empty() {
            return key == &self.key[..];
        }
        key >= &self.key[..] && (&self.range_end[..] == b"\0" || key < &self.range_end[..])
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortOrder {
    #[default]
    None,
    Ascend,
    Descend,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortTarget {
    #[default]
    Key,
    Version,
    Create,
    Mod,
    Value,
}

/// `RangeRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeRequest {
    pub range: KeyRange,
    /// At most this many keys (0: no limit).
    pub limit: i64,
    /// Read at this revision (0: the current one).
    pub revision: Revision,
    pub sort_order: SortOrder,
    pub sort_target: SortTarget,
    pub keys_only: bool,
    pub count_only: bool,
    pub min_mod_revision: Revision,
    pub max_mod_revision: Revision,
    pub min_create_revision: Revision,
    pub max_create_revision: Revision,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeResponse {
    pub kvs: Vec<KeyValue>,
    /// More keys matched than `limit` allowed.
    pub more: bool,
    /// How many keys matched in all.
    pub count: i64,
}

/// `PutRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PutRequest {
    pub key: Bytes,
    pub value: Bytes,
    pub lease: i64,
    pub prev_kv: bool,
    /// Keep the current value (the key must exist).
    pub ignore_value: bool,
    /// Keep the current lease (the key must exist).
    pub ignore_lease: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PutResponse {
    pub prev_kv: Option<KeyValue>,
}

/// `DeleteRangeRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeleteRangeRequest {
    pub range: KeyRange,
    pub prev_kv: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeleteRangeResponse {
    pub deleted: i64,
    pub prev_kvs: Vec<KeyValue>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareResult {
    Equal,
    Greater,
    Less,
    NotEqual,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompareTarget {
    Version(i64),
    Create(Revision),
    Mod(Revision),
    Value(Bytes),
    Lease(i64),
}

/// `Compare`: every key in `range` must satisfy `target <result> value`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    pub range: KeyRange,
    pub result: CompareResult,
    pub target: CompareTarget,
}

/// `RequestOp`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestOp {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
}

/// `ResponseOp`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResponseOp {
    Range(RangeResponse),
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
}

/// `TxnRequest`: if every compare holds, `success` runs, else `failure`; atomically, at one
/// revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxnRequest {
    pub compare: Vec<Compare>,
    pub success: Vec<RequestOp>,
    pub failure: Vec<RequestOp>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxnResponse {
    pub succeeded: bool,
    pub responses: Vec<ResponseOp>,
    /// The revision each response's header carries, as etcd fills it: what the transaction
    /// read at once that operation had run (the revision before the transaction's writes,
    /// or its own once it has written). A nested transaction's own header has none (0).
    pub revisions: Vec<Revision>,
}
