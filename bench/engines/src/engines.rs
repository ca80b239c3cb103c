//! The two candidates behind one trait: redb (a copy-on-write B-tree) and fjall (an LSM
//! tree, optionally with key-value separation).

use super::*;

pub(crate) trait Engine: Sync {
    /// Commit one batch durably (fsync before returning).
    fn put_batch(&self, b: &BatchData);
    /// Point read of the latest committed value; returns its length.
    fn get(&self, i: u64) -> usize;
    /// Read `n` consecutive pairs from `start`; returns (count, value bytes).
    fn scan(&self, start: u64, n: usize) -> (usize, u64);
    /// Open a consistent snapshot, set `opened`, then visit every pair in order.
    fn stream(&self, opened: &AtomicBool, visit: &mut dyn FnMut(&[u8], &[u8]));
    /// Let background work finish; returns a note for the report.
    fn settle(&self) -> String;
    /// Drop the handle and open the database again; returns
    /// (time to drop, time from open call to first successful get).
    fn reopen(&mut self) -> (Duration, Duration);
    fn note(&self) -> String {
        String::new()
    }
}

// redb ---------------------------------------------------------------------

pub(crate) const TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("kv");

pub(crate) struct Redb {
    pub(crate) db: Option<redb::Database>,
    pub(crate) path: PathBuf,
    pub(crate) cache: Option<usize>,
}

impl Redb {
    pub(crate) fn builder(cache: Option<usize>) -> redb::Builder {
        let mut b = redb::Database::builder();
        if let Some(c) = cache {
            b.set_cache_size(c);
        }
        b
    }
    pub(crate) fn open(dir: &Path, cache: Option<usize>) -> Self {
        let path = dir.join("data.redb");
        let db = Self::builder(cache).create(&path).unwrap();
        // Create the table so readers never see it missing.
        let tx = db.begin_write().unwrap();
        tx.open_table(TABLE).unwrap();
        tx.commit().unwrap();
        Redb {
            db: Some(db),
            path,
            cache,
        }
    }
    fn db(&self) -> &redb::Database {
        self.db.as_ref().unwrap()
    }
}

impl Engine for Redb {
    fn put_batch(&self, b: &BatchData) {
        // Durability::Immediate is the default: commit() returns after fsync.
        let tx = self.db().begin_write().unwrap();
        {
            let mut t = tx.open_table(TABLE).unwrap();
            for (k, v) in b.iter() {
                t.insert(k, v).unwrap();
            }
        }
        tx.commit().unwrap();
    }

    fn get(&self, i: u64) -> usize {
        let tx = self.db().begin_read().unwrap();
        let t = tx.open_table(TABLE).unwrap();
        let g = t.get(&key(i)[..]).unwrap().expect("key missing");
        let n = g.value().len();
        n
    }

    fn scan(&self, start: u64, n: usize) -> (usize, u64) {
        let tx = self.db().begin_read().unwrap();
        let t = tx.open_table(TABLE).unwrap();
        let k = key(start);
        let mut count = 0;
        let mut bytes = 0u64;
        for item in t.range(&k[..]..).unwrap().take(n) {
            let (_k, v) = item.unwrap();
            count += 1;
            bytes += v.value().len() as u64;
        }
        (count, bytes)
    }

    fn stream(&self, opened: &AtomicBool, visit: &mut dyn FnMut(&[u8], &[u8])) {
        use redb::ReadableTable;
        // A read transaction is an MVCC snapshot of the last commit.
        let tx = self.db().begin_read().unwrap();
        let t = tx.open_table(TABLE).unwrap();
        opened.store(true, Ordering::SeqCst);
        for item in t.iter().unwrap() {
            let (k, v) = item.unwrap();
            visit(k.value(), v.value());
        }
    }

    fn settle(&self) -> String {
        "none needed (no background work)".into()
    }

    fn reopen(&mut self) -> (Duration, Duration) {
        let t0 = Instant::now();
        drop(self.db.take());
        let dropped = t0.elapsed();
        let t1 = Instant::now();
        self.db = Some(Self::builder(self.cache).open(&self.path).unwrap());
        assert_eq!(self.get(0), VALUE_LEN);
        (dropped, t1.elapsed())
    }

    fn note(&self) -> String {
        let tx = self.db().begin_write().unwrap();
        let st = tx.stats().unwrap();
        let out = format!(
            "page={}B leaf_pages={} branch_pages={} stored={:.0}MB metadata={:.0}MB fragmented={:.0}MB",
            st.page_size(),
            st.leaf_pages(),
            st.branch_pages(),
            mb(st.stored_bytes()),
            mb(st.metadata_bytes()),
            mb(st.fragmented_bytes()),
        );
        tx.abort().unwrap();
        out
    }
}

// fjall --------------------------------------------------------------------

pub(crate) struct Fjall {
    ks: Option<fjall::Keyspace>,
    part: Option<fjall::PartitionHandle>,
    dir: PathBuf,
    kv_sep: bool,
}

impl Fjall {
    fn open_at(dir: &Path, kv_sep: bool) -> (fjall::Keyspace, fjall::PartitionHandle) {
        let ks = fjall::Config::new(dir).open().unwrap();
        let mut opts = fjall::PartitionCreateOptions::default();
        if kv_sep {
            opts = opts.with_kv_separation(fjall::KvSeparationOptions::default());
        }
        let part = ks.open_partition("kv", opts).unwrap();
        (ks, part)
    }
    pub(crate) fn open(dir: &Path, kv_sep: bool) -> Self {
        let (ks, part) = Self::open_at(dir, kv_sep);
        Fjall {
            ks: Some(ks),
            part: Some(part),
            dir: dir.to_path_buf(),
            kv_sep,
        }
    }
    fn ks(&self) -> &fjall::Keyspace {
        self.ks.as_ref().unwrap()
    }
    fn part(&self) -> &fjall::PartitionHandle {
        self.part.as_ref().unwrap()
    }
}

impl Engine for Fjall {
    fn put_batch(&self, b: &BatchData) {
        // The batch is appended to the journal and fsynced (SyncAll) under the
        // journal lock before it is applied to the memtable.
        let mut batch = self
            .ks()
            .batch()
            .durability(Some(fjall::PersistMode::SyncAll));
        for (k, v) in b.iter() {
            batch.insert(self.part(), k, v);
        }
        batch.commit().unwrap();
    }

    fn get(&self, i: u64) -> usize {
        self.part().get(key(i)).unwrap().expect("key missing").len()
    }

    fn scan(&self, start: u64, n: usize) -> (usize, u64) {
        let k = key(start);
        let mut count = 0;
        let mut bytes = 0u64;
        for item in self.part().range(&k[..]..).take(n) {
            let (_k, v) = item.unwrap();
            count += 1;
            bytes += v.len() as u64;
        }
        (count, bytes)
    }

    fn stream(&self, opened: &AtomicBool, visit: &mut dyn FnMut(&[u8], &[u8])) {
        // A snapshot pins the current sequence number; later writes are
        // filtered out and the versions it needs are kept through compaction.
        let snap = self.part().snapshot();
        opened.store(true, Ordering::SeqCst);
        for item in snap.iter() {
            let (k, v) = item.unwrap();
            visit(&k, &v);
        }
    }

    fn settle(&self) -> String {
        // Flushes and compactions run on fjall's own background threads.
        // Wait until no compaction is active and the flush count has been
        // unchanged for 2 s (cap 120 s).
        let t0 = Instant::now();
        let ks = self.ks();
        let mut last_flushes = ks.flushes_completed();
        let mut quiet_since = Instant::now();
        while t0.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(100));
            let f = ks.flushes_completed();
            if f != last_flushes || ks.active_compactions() > 0 {
                last_flushes = f;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= Duration::from_secs(2) {
                break;
            }
        }
        let waited = t0.elapsed().saturating_sub(Duration::from_secs(2));
        format!(
            "background work finished ~{:.1}s after load; flushes={} compactions={} \
             (compaction time {:.1}s) segments={} blob_files={} journals={} write_buffer={}MiB",
            waited.as_secs_f64(),
            ks.flushes_completed(),
            ks.compactions_completed(),
            ks.time_compacting().as_secs_f64(),
            self.part().segment_count(),
            self.part().blob_file_count(),
            ks.journal_count(),
            ks.write_buffer_size() >> 20,
        )
    }

    fn reopen(&mut self) -> (Duration, Duration) {
        let t0 = Instant::now();
        drop(self.part.take());
        drop(self.ks.take());
        let dropped = t0.elapsed();
        let t1 = Instant::now();
        let (ks, part) = Self::open_at(&self.dir, self.kv_sep);
        self.ks = Some(ks);
        self.part = Some(part);
        assert_eq!(self.get(0), VALUE_LEN);
        (dropped, t1.elapsed())
    }

    fn note(&self) -> String {
        format!(
            "flushes={} compactions={} segments={} blob_files={} journals={}",
            self.ks().flushes_completed(),
            self.ks().compactions_completed(),
            self.part().segment_count(),
            self.part().blob_file_count(),
            self.ks().journal_count()
        )
    }
}

// ---------------------------------------------------------------- measuring
