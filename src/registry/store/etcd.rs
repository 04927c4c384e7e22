//! The etcd store (SPEC §8): the registry of several gateways in one etcd
//! cluster, through `etcd-client` (tonic).
//!
//! One key per instance, `<prefix>/instances/<service>/<id>`, its value the
//! [`Record`] as JSON. A commit is one etcd transaction holding every
//! change of the batch, so a write is acknowledged once etcd has committed
//! it. etcd refuses transactions of more than `--max-txn-ops` (128 by
//! default) operations: a larger batch (or the removal of a service of
//! more than 128 instances) is committed as several transactions, in
//! order.
//!
//! Every request is bounded by `connect_timeout`, so an unreachable
//! cluster fails a write fast (503 `store_unavailable`) instead of
//! hanging it.
//!
//! TTLs live on etcd leases: an instance registered with a TTL is put on
//! a lease granted for it, a heartbeat at any gateway keeps that lease
//! alive, and etcd deletes the key when it runs out, which every gateway
//! then sees as a removal, even when the gateway that took the
//! registration is gone.
//!
//! Agreement: [`RegistryStore::follow`] watches the prefix from the
//! revision right after the load, so every change any gateway commits
//! reaches this one, in etcd's order. This gateway's own commits come back
//! too; their revisions are remembered and skipped. When the watch breaks
//! (etcd restarted, the network), it is made again from the revision after
//! the last one seen.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;

use super::{Change, Followed, Record, RegistryStore, StoreError, StoreFuture};
use crate::config::RegistryConfig;

/// Pause before making a broken watch again.
const REWATCH_AFTER: Duration = Duration::from_millis(250);

/// Operations per etcd transaction (etcd's default `--max-txn-ops`).
const MAX_TXN_OPS: usize = 128;

pub struct EtcdStore {
    client: Client,
    prefix: String,
    endpoints: String,
    /// The revision the load read.
    loaded_at: AtomicI64,
    /// Revisions of this gateway's own commits not yet seen by the watch.
    own: Arc<Mutex<BTreeSet<i64>>>,
    /// Why etcd cannot be reached, as the last commit or the watch found.
    unreachable: Reachability,
}

/// Whether etcd answered the last time it was asked, and if not, why.
#[derive(Debug, Clone, Default)]
struct Reachability(Arc<Mutex<Option<String>>>);

impl Reachability {
    fn set(&self, why: Option<String>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = why;
    }

    fn get(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl EtcdStore {
    /// Connects to the cluster `config` names, within its
    /// `connect_timeout`.
    pub async fn connect(config: &RegistryConfig) -> Result<Self, StoreError> {
        let endpoints = config.endpoints.join(",");
        let options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_timeout(config.connect_timeout);
        let connecting = Client::connect(&config.endpoints, Some(options));
        let client = match tokio::time::timeout(config.connect_timeout, connecting).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                return Err(StoreError(format!(
                    "registry store etcd {endpoints}: cannot connect: {e}"
                )));
            }
            Err(_) => {
                return Err(StoreError(format!(
                    "registry store etcd {endpoints}: cannot connect within {}",
                    crate::config::fmt_duration(config.connect_timeout)
                )));
            }
        };
        // The client connects lazily: ask something small to know now.
        let mut probe = client.kv_client();
        if let Err(e) = probe
            .get(
                config.prefix.as_str(),
                Some(GetOptions::new().with_count_only()),
            )
            .await
        {
            return Err(StoreError(format!(
                "registry store etcd {endpoints}: cannot connect: {e}"
            )));
        }
        Ok(Self {
            client,
            prefix: format!("{}/", config.prefix.trim_end_matches('/')),
            endpoints,
            loaded_at: AtomicI64::new(0),
            own: Arc::default(),
            unreachable: Reachability::default(),
        })
    }

    fn remember(&self, revision: Option<i64>) {
        if let Some(revision) = revision {
            self.own
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(revision);
        }
    }

    fn instances(&self) -> String {
        format!("{}instances/", self.prefix)
    }

    fn key(&self, service: &str, id: &str) -> String {
        format!("{}{service}/{id}", self.instances())
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError(format!(
            "registry store etcd {}: {what}: {e}",
            self.endpoints
        ))
    }

    /// The transaction operation of `change`, if it has one: a put of an
    /// instance with a TTL goes on a lease granted for it first, and a
    /// renewal is a keep-alive of the instance's lease, sent here.
    async fn op(&self, change: &Change) -> Result<Option<TxnOp>, StoreError> {
        Ok(Some(match change {
            Change::Put(record) => {
                // Serializing a record of strings cannot fail.
                let value = serde_json::to_vec(record).unwrap_or_default();
                let options = match record.ttl_ms {
                    Some(ttl) => Some(PutOptions::new().with_lease(self.grant(ttl).await?)),
                    None => None,
                };
                TxnOp::put(self.key(&record.service, &record.id), value, options)
            }
            Change::Delete { service, id } => TxnOp::delete(self.key(service, id), None),
            Change::Renew { service, id } => {
                self.keep_alive(service, id).await?;
                return Ok(None);
            }
        }))
    }

    /// A lease of `ttl_ms`, rounded up to etcd's whole seconds.
    async fn grant(&self, ttl_ms: u64) -> Result<i64, StoreError> {
        let seconds = ttl_ms.div_ceil(1000).max(1) as i64;
        let granted = self
            .client
            .lease_client()
            .grant(seconds, None)
            .await
            .map_err(|e| self.fail("cannot grant a lease", e))?;
        Ok(granted.id())
    }

    /// Renews the lease the instance's key is on, if it is on one.
    async fn keep_alive(&self, service: &str, id: &str) -> Result<(), StoreError> {
        let key = self.key(service, id);
        let found = self
            .client
            .kv_client()
            .get(key.as_str(), None)
            .await
            .map_err(|e| self.fail("cannot read", e))?;
        let Some(lease) = found.kvs().first().map(|kv| kv.lease()).filter(|&l| l != 0) else {
            // Gone already (its delete is on its way) or without a TTL.
            return Ok(());
        };
        // Opening the keep-alive stream sends one renewal and waits for
        // its answer; that is the whole heartbeat.
        match self.client.lease_client().keep_alive(lease).await {
            Ok(_) => Ok(()),
            // Expired meanwhile: its key's deletion is on its way.
            Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(()),
            Err(e) => Err(self.fail("cannot renew a lease", e)),
        }
    }
}

impl RegistryStore for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd {} prefix {}", self.endpoints, self.prefix)
    }

    fn load(&self) -> StoreFuture<'_, Vec<Record>> {
        Box::pin(async move {
            let mut kv = self.client.kv_client();
            let response = kv
                .get(self.instances(), Some(GetOptions::new().with_prefix()))
                .await
                .map_err(|e| self.fail("cannot read", e))?;
            let revision = response.header().map_or(0, |h| h.revision());
            self.loaded_at.store(revision, Ordering::Relaxed);
            let mut records = Vec::with_capacity(response.kvs().len());
            for kv in response.kvs() {
                let record: Record = serde_json::from_slice(kv.value()).map_err(|e| {
                    let key = String::from_utf8_lossy(kv.key());
                    self.fail(&format!("the value of {key} is not valid"), e)
                })?;
                records.push(record);
            }
            Ok(records)
        })
    }

    fn commit(&self, changes: Vec<Change>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let done = self.commit_all(&changes).await;
            self.unreachable
                .set(done.as_ref().err().map(|e| e.0.clone()));
            done
        })
    }

    fn unreachable(&self) -> Option<String> {
        self.unreachable.get()
    }

    fn keeps_ttls(&self) -> bool {
        true
    }

    fn follow(&self) -> Option<mpsc::UnboundedReceiver<Followed>> {
        let (changes, received) = mpsc::unbounded_channel();
        let watch = Watch {
            client: self.client.clone(),
            instances: self.instances(),
            own: self.own.clone(),
            endpoints: self.endpoints.clone(),
            next: self.loaded_at.load(Ordering::Relaxed) + 1,
            unreachable: self.unreachable.clone(),
        };
        tokio::spawn(watch.run(changes));
        Some(received)
    }
}

impl EtcdStore {
    /// Commits `changes` in as few transactions as etcd takes.
    async fn commit_all(&self, changes: &[Change]) -> Result<(), StoreError> {
        {
            let mut kv = self.client.kv_client();
            let mut ops = Vec::with_capacity(changes.len().min(MAX_TXN_OPS));
            for change in changes {
                let Some(op) = self.op(change).await? else {
                    continue;
                };
                ops.push(op);
                if ops.len() == MAX_TXN_OPS {
                    let txn = Txn::new().and_then(std::mem::take(&mut ops));
                    let done = kv
                        .txn(txn)
                        .await
                        .map_err(|e| self.fail("cannot write", e))?;
                    self.remember(done.header().map(|h| h.revision()));
                }
            }
            if !ops.is_empty() {
                let done = kv
                    .txn(Txn::new().and_then(ops))
                    .await
                    .map_err(|e| self.fail("cannot write", e))?;
                self.remember(done.header().map(|h| h.revision()));
            }
            Ok(())
        }
    }
}

/// The watch of the instances' keys, made again when it breaks.
struct Watch {
    client: Client,
    instances: String,
    own: Arc<Mutex<BTreeSet<i64>>>,
    endpoints: String,
    /// The first revision not yet seen.
    next: i64,
    unreachable: Reachability,
}

impl Watch {
    /// Sends every change of others until the receiver is dropped.
    async fn run(mut self, changes: mpsc::UnboundedSender<Followed>) {
        while !changes.is_closed() {
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(self.next);
            let mut watcher = self.client.watch_client();
            match watcher.watch(self.instances.clone(), Some(options)).await {
                Ok(mut stream) => loop {
                    self.unreachable.set(None);
                    match stream.message().await {
                        Ok(Some(response)) => {
                            if response.compact_revision() > 0 {
                                tracing::warn!(
                                    endpoints = self.endpoints,
                                    from = self.next,
                                    compacted = response.compact_revision(),
                                    "registry store etcd: the watch's revision was compacted; \
                                     reloading everything"
                                );
                                match self.everything().await {
                                    Ok(records) => {
                                        let _ = changes.send(Followed::Everything {
                                            records,
                                            done: None,
                                        });
                                    }
                                    Err(e) => tracing::warn!(
                                        error = %e,
                                        "registry store etcd: cannot reload yet"
                                    ),
                                }
                                break;
                            }
                            if response.canceled() {
                                break;
                            }
                            for event in response.events() {
                                if let Some(change) = self.change_of(event) {
                                    let _ = changes.send(Followed::Change(change));
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(
                                endpoints = self.endpoints,
                                error = %e,
                                "registry store etcd: the watch broke; making it again"
                            );
                            self.unreachable.set(Some(format!(
                                "registry store etcd {}: the watch broke: {e}",
                                self.endpoints
                            )));
                            break;
                        }
                    }
                },
                Err(e) => {
                    tracing::debug!(error = %e, "registry store etcd: cannot watch yet");
                    self.unreachable.set(Some(format!(
                        "registry store etcd {}: cannot watch: {e}",
                        self.endpoints
                    )));
                }
            }
            tokio::time::sleep(REWATCH_AFTER).await;
        }
    }

    /// Every instance etcd holds now; the watch goes on from the revision
    /// after this read.
    async fn everything(&mut self) -> Result<Vec<Record>, etcd_client::Error> {
        let response = self
            .client
            .kv_client()
            .get(
                self.instances.clone(),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let records = response
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect();
        if let Some(header) = response.header() {
            self.next = header.revision() + 1;
        }
        Ok(records)
    }

    /// The change an event stands for, unless this gateway made it.
    fn change_of(&mut self, event: &etcd_client::Event) -> Option<Change> {
        let kv = event.kv()?;
        let revision = kv.mod_revision();
        self.next = self.next.max(revision + 1);
        {
            let mut own = self.own.lock().unwrap_or_else(PoisonError::into_inner);
            // Revisions come in order: own ones below this were seen.
            *own = own.split_off(&revision);
            if own.contains(&revision) {
                return None;
            }
        }
        match event.event_type() {
            EventType::Put => match serde_json::from_slice::<Record>(kv.value()) {
                Ok(record) => Some(Change::Put(record)),
                Err(e) => {
                    tracing::warn!(
                        key = %String::from_utf8_lossy(kv.key()),
                        error = %e,
                        "registry store etcd: a value that is not an instance was skipped"
                    );
                    None
                }
            },
            EventType::Delete => {
                let key = std::str::from_utf8(kv.key()).ok()?;
                let (service, id) = key.strip_prefix(&self.instances)?.split_once('/')?;
                Some(Change::Delete {
                    service: service.to_string(),
                    id: id.to_string(),
                })
            }
        }
    }
}

/// The etcd store of a gateway that started without reaching etcd
/// (`require_store_at_start = false`): it serves its static services,
/// refuses registry writes with 503 `store_unavailable`, and connects in
/// the background; once connected it loads everything, hands it to the
/// registry as one catch-up, and follows from there like any gateway.
pub struct Later {
    config: RegistryConfig,
    store: Arc<OnceLock<EtcdStore>>,
}

impl Later {
    pub fn new(config: RegistryConfig) -> Self {
        Self {
            config,
            store: Arc::default(),
        }
    }

    fn not_yet(&self) -> StoreError {
        StoreError(format!(
            "registry store etcd {}: not connected yet",
            self.config.endpoints.join(",")
        ))
    }
}

impl RegistryStore for Later {
    fn describe(&self) -> String {
        match self.store.get() {
            Some(store) => store.describe(),
            None => format!(
                "etcd {} prefix {} (not connected yet)",
                self.config.endpoints.join(","),
                self.config.prefix
            ),
        }
    }

    fn load(&self) -> StoreFuture<'_, Vec<Record>> {
        // Nothing yet: the catch-up brings it once connected.
        Box::pin(std::future::ready(Ok(Vec::new())))
    }

    fn commit(&self, changes: Vec<Change>) -> StoreFuture<'_, ()> {
        match self.store.get() {
            Some(store) => store.commit(changes),
            None => Box::pin(std::future::ready(Err(self.not_yet()))),
        }
    }

    fn follow(&self) -> Option<mpsc::UnboundedReceiver<Followed>> {
        let (followed, received) = mpsc::unbounded_channel();
        let (config, slot) = (self.config.clone(), self.store.clone());
        tokio::spawn(async move {
            let store = loop {
                if followed.is_closed() {
                    return;
                }
                if let Ok(store) = EtcdStore::connect(&config).await {
                    match store.load().await {
                        Ok(records) => {
                            let (done, caught_up) = tokio::sync::oneshot::channel();
                            let done = Some(done);
                            let _ = followed.send(Followed::Everything { records, done });
                            // Writes are taken only once the registry holds
                            // what etcd holds, so none is undone by the
                            // catch-up.
                            if caught_up.await.is_err() {
                                return;
                            }
                            break store;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "registry store etcd: cannot load yet")
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            };
            tracing::info!(store = %store.describe(), "registry store connected");
            let Some(mut changes) = store.follow() else {
                return;
            };
            let _ = slot.set(store);
            while let Some(change) = changes.recv().await {
                if followed.send(change).is_err() {
                    return;
                }
            }
        });
        Some(received)
    }

    fn unreachable(&self) -> Option<String> {
        match self.store.get() {
            Some(store) => store.unreachable(),
            None => Some(self.not_yet().0),
        }
    }

    fn keeps_ttls(&self) -> bool {
        true
    }
}
