//! The etcd store (SPEC §8): the registry of several gateways in one etcd
//! cluster, through `etcd-client` (tonic).
//!
//! One key per instance, `<prefix>instances/<service>/<id>`, its value the
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

use etcd_client::{Client, ConnectOptions, GetOptions, Txn, TxnOp};

use super::{Change, Record, RegistryStore, StoreError, StoreFuture};
use crate::config::RegistryConfig;

/// Operations per etcd transaction (etcd's default `--max-txn-ops`).
const MAX_TXN_OPS: usize = 128;

pub struct EtcdStore {
    client: Client,
    prefix: String,
    endpoints: String,
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
        Ok(Self {
            client,
            prefix: config.prefix.clone(),
            endpoints,
        })
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

    fn op(&self, change: &Change) -> TxnOp {
        match change {
            Change::Put(record) => {
                // Serializing a record of strings cannot fail.
                let value = serde_json::to_vec(record).unwrap_or_default();
                TxnOp::put(self.key(&record.service, &record.id), value, None)
            }
            Change::Delete { service, id } => TxnOp::delete(self.key(service, id), None),
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
            let mut kv = self.client.kv_client();
            let mut ops = Vec::with_capacity(changes.len().min(MAX_TXN_OPS));
            for change in &changes {
                ops.push(self.op(change));
                if ops.len() == MAX_TXN_OPS {
                    let txn = Txn::new().and_then(std::mem::take(&mut ops));
                    kv.txn(txn)
                        .await
                        .map_err(|e| self.fail("cannot write", e))?;
                }
            }
            if !ops.is_empty() {
                kv.txn(Txn::new().and_then(ops))
                    .await
                    .map_err(|e| self.fail("cannot write", e))?;
            }
            Ok(())
        })
    }
}
