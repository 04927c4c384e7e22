//! The file store: every registration in one redb database file.
//!
//! redb is an embedded, ACID key-value store written for this kind of
//! job: a commit with `Durability::Immediate` is on disk (fsync) when it
//! returns, and a file left by a process killed at any moment opens to
//! the last committed state. Each [`commit`](RegistryStore::commit) is one
//! write transaction holding a whole batch of changes, so many concurrent
//! registrations share one fsync.
//!
//! Layout: table `instances`, key `(service, id)`, value the [`Record`]
//! as JSON (readable with any redb tool, and new optional fields stay
//! compatible); table `meta` holds the format version, so a file written
//! by another program, or a future incompatible format, is refused rather
//! than misread.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Change, Record, RegistryStore, StoreError, StoreFuture};

const INSTANCES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("instances");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The layout this code writes and reads.
const FORMAT: u64 = 1;

pub struct FileStore {
    db: Arc<Database>,
    path: PathBuf,
}

impl FileStore {
    /// Opens (or creates) the file at `path` and checks that it is one of
    /// ours. The error names the file and the problem.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            StoreError(format!("registry store {}: {what}: {e}", path.display()))
        };
        let db = Database::create(path).map_err(|e| fail("cannot open", &e))?;
        let write = db.begin_write().map_err(|e| fail("cannot write", &e))?;
        {
            let mut meta = write
                .open_table(META)
                .map_err(|e| fail("not a registry file", &e))?;
            let format = meta
                .get("format")
                .map_err(|e| fail("cannot read", &e))?
                .map(|v| v.value());
            match format {
                Some(FORMAT) => {}
                None => {
                    meta.insert("format", FORMAT)
                        .map_err(|e| fail("cannot write", &e))?;
                }
                Some(other) => {
                    return Err(fail(
                        "wrong format",
                        &format!("version {other}, this build reads version {FORMAT}"),
                    ));
                }
            }
            write
                .open_table(INSTANCES)
                .map_err(|e| fail("not a registry file", &e))?;
        }
        write.commit().map_err(|e| fail("cannot write", &e))?;
        Ok(Self {
            db: Arc::new(db),
            path: path.to_path_buf(),
        })
    }

    fn read_all(db: &Database, path: &Path) -> Result<Vec<Record>, StoreError> {
        let fail = |e: &dyn std::fmt::Display| {
            StoreError(format!(
                "registry store {}: cannot read: {e}",
                path.display()
            ))
        };
        let read = db.begin_read().map_err(|e| fail(&e))?;
        let table = read.open_table(INSTANCES).map_err(|e| fail(&e))?;
        let mut records = Vec::new();
        for entry in table.iter().map_err(|e| fail(&e))? {
            let (key, value) = entry.map_err(|e| fail(&e))?;
            let record: Record = serde_json::from_slice(value.value()).map_err(|e| {
                let (service, id) = key.value();
                fail(&format!("the entry of {service}/{id} is not valid: {e}"))
            })?;
            records.push(record);
        }
        Ok(records)
    }

    fn write(db: &Database, changes: &[Change]) -> Result<(), redb::Error> {
        let mut write = db.begin_write()?;
        write.set_durability(Durability::Immediate)?;
        {
            let mut table = write.open_table(INSTANCES)?;
            for change in changes {
                match change {
                    Change::Put(record) => {
                        // Serializing a record of strings cannot fail.
                        let value = serde_json::to_vec(record).unwrap_or_default();
                        table.insert(
                            (record.service.as_str(), record.id.as_str()),
                            value.as_slice(),
                        )?;
                    }
                    Change::Delete { service, id } => {
                        table.remove((service.as_str(), id.as_str()))?;
                    }
                }
            }
        }
        write.commit()?;
        Ok(())
    }
}

impl RegistryStore for FileStore {
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    fn load(&self) -> StoreFuture<'_, Vec<Record>> {
        let (db, path) = (self.db.clone(), self.path.clone());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || Self::read_all(&db, &path))
                .await
                .map_err(|e| StoreError(format!("the store's reader failed: {e}")))?
        })
    }

    fn commit(&self, changes: Vec<Change>) -> StoreFuture<'_, ()> {
        let (db, path) = (self.db.clone(), self.path.clone());
        Box::pin(async move {
            let written = tokio::task::spawn_blocking(move || Self::write(&db, &changes))
                .await
                .map_err(|e| StoreError(format!("the store's writer failed: {e}")))?;
            written.map_err(|e| {
                StoreError(format!(
                    "registry store {}: cannot write: {e}",
                    path.display()
                ))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(service: &str, id: &str, url: &str) -> Record {
        Record {
            service: service.into(),
            id: id.into(),
            url: url.into(),
            metadata: [("zone".to_string(), "a".to_string())].into(),
            registered_at_ms: 1_764_669_600_000,
            ttl_ms: Some(15_000),
            draining: false,
        }
    }

    fn dir() -> tempdir::Dir {
        tempdir::Dir::new()
    }

    /// A directory of its own, removed when the test ends.
    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path = std::env::temp_dir()
                    .join(format!("switchyard-store-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&path).unwrap();
                Self(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[tokio::test]
    async fn changes_survive_reopening_in_order() {
        let dir = dir();
        let path = dir.0.join("registry.db");
        {
            let store = FileStore::open(&path).unwrap();
            assert!(store.load().await.unwrap().is_empty());
            store
                .commit(vec![
                    Change::Put(record("a", "1", "http://h:1")),
                    Change::Put(record("a", "2", "http://h:2")),
                    Change::Put(record("b", "1", "http://h:3")),
                ])
                .await
                .unwrap();
            let mut drained = record("a", "2", "http://h:2");
            drained.draining = true;
            store
                .commit(vec![
                    Change::Delete {
                        service: "b".into(),
                        id: "1".into(),
                    },
                    Change::Put(drained),
                    Change::Delete {
                        service: "nope".into(),
                        id: "x".into(),
                    },
                ])
                .await
                .unwrap();
        }
        let store = FileStore::open(&path).unwrap();
        let mut loaded = store.load().await.unwrap();
        loaded.sort_by(|a, b| (&a.service, &a.id).cmp(&(&b.service, &b.id)));
        let mut expected_2 = record("a", "2", "http://h:2");
        expected_2.draining = true;
        assert_eq!(loaded, [record("a", "1", "http://h:1"), expected_2]);
        assert_eq!(store.describe(), format!("file {}", path.display()));
    }

    #[test]
    fn a_file_that_is_not_a_registry_is_refused_with_its_name() {
        let dir = dir();
        let path = dir.0.join("notes.txt");
        std::fs::write(&path, vec![b'x'; 10_000]).unwrap();
        let error = FileStore::open(&path).err().expect("refused");
        assert!(error.0.contains(&path.display().to_string()), "{error}");
    }

    #[tokio::test]
    async fn another_format_version_is_refused() {
        let dir = dir();
        let path = dir.0.join("future.db");
        {
            let db = Database::create(&path).unwrap();
            let write = db.begin_write().unwrap();
            write
                .open_table(META)
                .unwrap()
                .insert("format", 99)
                .unwrap();
            write.commit().unwrap();
        }
        let error = FileStore::open(&path).err().expect("refused");
        assert!(error.0.contains("wrong format"), "{error}");
        assert!(error.0.contains("version 99"), "{error}");
    }
}
