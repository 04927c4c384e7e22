//! Where registrations are kept (SPEC §7): behind one [`RegistryStore`],
//! in memory only or in one crash-safe file.
//!
//! The in-memory registry stays the read path: lookups never touch a
//! store. A store sees only writes, as batches of [`Change`]s that the
//! registry's writer commits together (group commit), and it is read once,
//! at start ([`RegistryStore::load`]). A write is acknowledged to its
//! client only after [`RegistryStore::commit`] has returned: with the file
//! store, once it is on disk.
//!
//! What is stored of an instance is what was registered ([`Record`]): its
//! URL, metadata, TTL and drain state. Health, circuit and TTL deadlines
//! are live state: after a restart every instance starts `unknown`,
//! circuit `closed`, checked at once, and each TTL runs from the load.

#[cfg(feature = "etcd")]
mod etcd;
mod file;
mod memory;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::config::{RegistryConfig, StoreKind};
pub use file::FileStore;
pub use memory::MemoryStore;

/// One instance as a store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub service: String,
    pub id: String,
    pub url: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// When the instance was first registered, in milliseconds since the
    /// Unix epoch.
    pub registered_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

/// One change to the stored registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// The instance, as it now is (added or replaced).
    Put(Record),
    /// The instance is gone.
    Delete { service: String, id: String },
    /// A heartbeat: the instance's TTL starts again. Only a store that
    /// keeps TTLs itself ([`RegistryStore::keeps_ttls`]) is sent these.
    Renew { service: String, id: String },
}

/// What a shared store reports of the other gateways' writes.
#[derive(Debug)]
pub enum Followed {
    /// One change, in the store's order.
    Change(Change),
    /// Everything the store holds now, read again because the changes
    /// since the last one seen are gone (etcd compacted them, or the
    /// gateway started without the store): whatever the registry holds
    /// that is not in it was removed meanwhile. The registry answers on
    /// `done` once it holds exactly that.
    Everything {
        records: Vec<Record>,
        done: Option<tokio::sync::oneshot::Sender<()>>,
    },
}

/// Why a store could not be opened, read or written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

/// A future a store returns: boxed, so the trait stays object-safe.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Where registrations are kept.
pub trait RegistryStore: Send + Sync + 'static {
    /// What it is, for logs and `check-config` (`file switchyard.db`).
    fn describe(&self) -> String;

    /// Every stored instance, in no particular order. Called once, at start.
    fn load(&self) -> StoreFuture<'_, Vec<Record>>;

    /// Makes `changes` durable, in their order, as one unit: when this
    /// returns `Ok`, all of them survive a crash; on `Err`, none is
    /// acknowledged.
    fn commit(&self, changes: Vec<Change>) -> StoreFuture<'_, ()>;

    /// The changes other gateways commit from now on (a store shared by
    /// several, SPEC §8), from right after what [`RegistryStore::load`]
    /// read; `None` for a store only this gateway writes. Called once,
    /// after `load`.
    fn follow(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Followed>> {
        None
    }

    /// Why the store cannot be reached now, if it cannot (writes fail with
    /// 503 `store_unavailable` meanwhile); `None` when it can, or when it
    /// is local.
    fn unreachable(&self) -> Option<String> {
        None
    }

    /// Whether it runs the TTLs itself (etcd leases): then heartbeats are
    /// committed to it as [`Change::Renew`], it removes an instance whose
    /// TTL ran out (whichever gateway took the registration, even a dead
    /// one), and the gateway's own timer wheel stays out of it.
    fn keeps_ttls(&self) -> bool {
        false
    }

    /// Whether it keeps anything: `false` for the memory store, whose
    /// commit does nothing, so the writer applies each write in place
    /// without calling it.
    fn keeps_anything(&self) -> bool {
        true
    }
}

/// Opens the store `config` names. The error names the file and what is
/// wrong with it.
pub async fn open(config: &RegistryConfig) -> Result<Box<dyn RegistryStore>, StoreError> {
    match config.store {
        StoreKind::Memory => Ok(Box::new(MemoryStore)),
        StoreKind::File => Ok(Box::new(FileStore::open(&config.path)?)),
        #[cfg(feature = "etcd")]
        StoreKind::Etcd => match etcd::EtcdStore::connect(config).await {
            Ok(store) => Ok(Box::new(store)),
            Err(e) if !config.require_store_at_start => {
                tracing::warn!(error = %e, "starting without the registry store; trying again");
                Ok(Box::new(etcd::Later::new(config.clone())))
            }
            Err(e) => Err(e),
        },
        // Validation refuses `etcd` in a build without it.
        #[cfg(not(feature = "etcd"))]
        StoreKind::Etcd => Err(StoreError(
            "registry store etcd: this build has no etcd client (build with --features etcd)"
                .into(),
        )),
    }
}
