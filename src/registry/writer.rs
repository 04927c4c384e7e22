//! The registry's one writer: every change goes through it, in order, and
//! is acknowledged only once its store has committed it (SPEC §7).
//!
//! A write (registration, heartbeat, drain, removal, and the registry's
//! own expiries) is queued, with a channel for its answer, to the writer's
//! task. The task takes every write queued so far as one batch: it checks
//! each against the registry as it is plus the batch's earlier writes,
//! commits all their changes to the store in one transaction (group
//! commit: a hundred concurrent registrations cost one fsync), then
//! applies them to the in-memory registry in the same order and answers
//! each. While a batch commits, the next one queues up, so the batches
//! grow with the load. A write refused (bad input, a limit) changes nothing; a store
//! that fails the commit gets every write of the batch a 503
//! `store_unavailable`, and nothing of it is applied, so what the
//! registry shows is always what the store holds.
//!
//! The batch runs in the writer's own task: a client that goes away while
//! its write is being committed cannot leave the batch half done. The
//! memory store keeps nothing, so there is nothing to batch: each write is
//! planned and applied in place, in turn, under a plain lock.
//!
//! Two writes of one batch that touch the same instance (or a service and
//! one of its instances) would have to see each other's effect before
//! either is applied; rather than model that, the second one waits for
//! the next batch. Bulk registration of distinct instances, the case group
//! commit is for, never splits. A reload touches every service, so it has
//! a batch of its own.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use tokio::sync::{mpsc, oneshot};

use super::store::Change;
use super::{Instance, Reconfiguration, Registered, Registration, Registry};
use crate::error::{ErrorCode, GatewayError};

/// A change to the registry.
#[derive(Debug)]
pub enum Write {
    Register(Registration),
    /// Renews an instance's TTL.
    Heartbeat {
        service: String,
        id: String,
    },
    /// Takes an instance out of rotation (`draining`) or back in.
    SetState {
        service: String,
        id: String,
        draining: bool,
    },
    RemoveInstance {
        service: String,
        id: String,
    },
    RemoveService {
        service: String,
    },
    /// The instance's TTL ran out (unless a heartbeat renewed it since).
    Expire {
        service: Arc<str>,
        id: Arc<str>,
    },
    /// The instance has been unhealthy for `deregister_after` (unless it
    /// has recovered since).
    RemoveUnhealthy {
        service: Arc<str>,
        id: Arc<str>,
    },
    /// A change another gateway committed to the shared store: applied to
    /// memory only, in turn with this gateway's own writes.
    Remote(Change),
    /// A reloaded configuration ([`Registry::reconfigure`]).
    Reconfigure(Arc<Reconfiguration>),
}

/// What a write did.
#[derive(Debug)]
pub enum Written {
    Registered(Registered),
    /// The instance as it now is (heartbeat, drain).
    Instance(Arc<Instance>),
    Removed,
    /// The reloaded configuration is in force.
    Reconfigured,
    /// Nothing was left to do (an expiry a heartbeat overtook).
    Nothing,
}

type Reply = oneshot::Sender<Result<Written, GatewayError>>;

/// The queue of writes and the lock of the batch in progress.
#[derive(Debug, Default)]
pub struct Writer {
    /// The writer task's queue, made by the first write.
    queue: OnceLock<mpsc::UnboundedSender<(Write, Reply)>>,
    /// Whose turn it is, when writes run in place.
    in_place: Mutex<()>,
}

/// What one write will do, decided before anything is committed.
#[derive(Debug)]
pub(super) enum Plan {
    Refused(GatewayError),
    /// It touches what an earlier write of this batch touches: next batch.
    Later,
    /// Nothing to commit or apply.
    Nothing,
    Do {
        changes: Vec<Change>,
        apply: Apply,
    },
}

/// What one write does to the in-memory registry once committed.
#[derive(Debug)]
pub(super) enum Apply {
    Put {
        record: super::store::Record,
        created: bool,
    },
    Renew(Arc<Instance>),
    Drain(Arc<Instance>, super::store::Record),
    Remove {
        service: Arc<str>,
        id: Arc<str>,
    },
    RemoveService(Arc<str>),
    Reconfigure(Arc<Reconfiguration>),
}

/// What the writes planned so far in a batch touch.
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// One write applied in place: nothing to claim, nothing to commit.
    in_place: bool,
    /// A write that touches everything has claimed the batch.
    all: bool,
    instances: HashSet<(String, String)>,
    services: HashSet<String>,
    /// Instances the batch creates, registry-wide and per service.
    pub created: usize,
    pub created_in: HashMap<String, usize>,
}

impl Batch {
    /// Claims the instance `(service, id)` for this batch; false if an
    /// earlier write of it touched the instance or its whole service.
    /// A batch of one write, applied in place.
    pub fn in_place() -> Self {
        Self {
            in_place: true,
            ..Self::default()
        }
    }

    /// The changes `make` makes, when the store keeps them; none in place,
    /// where making them would be wasted.
    pub fn keep(&self, make: impl FnOnce() -> Vec<Change>) -> Vec<Change> {
        if self.in_place { Vec::new() } else { make() }
    }

    /// Counts an instance the batch creates in `service`, for the limits
    /// of the writes after it in the same batch.
    pub fn count_created(&mut self, service: &str) {
        if !self.in_place {
            self.created += 1;
            *self.created_in.entry(service.to_string()).or_default() += 1;
        }
    }

    pub fn claim(&mut self, service: &str, id: &str) -> bool {
        self.in_place
            || !self.all
                && !self.services.contains(service)
                && self.instances.insert((service.to_string(), id.to_string()))
    }

    /// Claims the whole service; false if this batch touched it already.
    pub fn claim_service(&mut self, service: &str) -> bool {
        self.in_place
            || !self.all
                && !self.services.contains(service)
                && !self.instances.iter().any(|(s, _)| s == service)
                && self.services.insert(service.to_string())
    }

    /// Claims every service and instance; false if this batch touched any.
    pub fn claim_all(&mut self) -> bool {
        if self.in_place {
            return true;
        }
        if self.all || !self.instances.is_empty() || !self.services.is_empty() {
            return false;
        }
        self.all = true;
        true
    }
}

impl Registry {
    /// Makes `write`, and answers once it is committed to the store and
    /// applied.
    pub async fn write(self: &Arc<Self>, write: Write) -> Result<Written, GatewayError> {
        if !self.store.keeps_anything() {
            return self.write_in_place(&write);
        }
        let (reply, answer) = oneshot::channel();
        let queue = self.writer.queue.get_or_init(|| {
            let (queue, writes) = mpsc::unbounded_channel();
            tokio::spawn(write_batches(Arc::downgrade(self), writes));
            queue
        });
        // The task ends only with the registry, which is alive here.
        let _ = queue.send((write, reply));
        answer.await.unwrap_or_else(|_| {
            Err(GatewayError::new(
                ErrorCode::StoreUnavailable,
                "the registry's writer stopped before answering",
            ))
        })
    }

    /// Commits and applies `queued`, in batches that never touch one
    /// instance twice.
    /// With nothing to commit, a write is planned and applied at once, in
    /// turn with the others: a plain lock, held for a few microseconds and
    /// never across an await.
    fn write_in_place(&self, write: &Write) -> Result<Written, GatewayError> {
        let _turn = self
            .writer
            .in_place
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match self.plan(write, &mut Batch::in_place()) {
            Plan::Refused(error) => Err(error),
            Plan::Nothing => Ok(Written::Nothing),
            Plan::Do { apply, .. } => Ok(self.apply(apply)),
            // An empty batch has claimed nothing: it cannot conflict.
            Plan::Later => Ok(Written::Nothing),
        }
    }

    /// Plans, commits and applies `queued` in order, in as few batches as
    /// their conflicts allow.
    async fn run(&self, queued: Vec<(Write, Reply)>) {
        let mut pending: VecDeque<_> = queued.into();
        while !pending.is_empty() {
            let mut batch = Batch::default();
            let mut changes = Vec::new();
            let mut planned = Vec::new();
            while let Some((write, reply)) = pending.pop_front() {
                match self.plan(&write, &mut batch) {
                    Plan::Later => {
                        pending.push_front((write, reply));
                        break;
                    }
                    Plan::Refused(error) => {
                        let _ = reply.send(Err(error));
                    }
                    Plan::Nothing => {
                        let _ = reply.send(Ok(Written::Nothing));
                    }
                    Plan::Do {
                        changes: more,
                        apply,
                    } => {
                        changes.extend(more);
                        planned.push((apply, reply));
                    }
                }
            }
            if !changes.is_empty()
                && let Err(error) = self.store.commit(changes).await
            {
                tracing::error!(%error, "registry store: commit failed; the writes were refused");
                for (_, reply) in planned {
                    let _ = reply.send(Err(GatewayError::new(
                        ErrorCode::StoreUnavailable,
                        format!("the registry store could not take the write: {error}"),
                    )));
                }
                continue;
            }
            for (apply, reply) in planned {
                let _ = reply.send(Ok(self.apply(apply)));
            }
        }
    }
}

/// The writer's task: each batch is every write queued since the last
/// one began. Ends when the registry is dropped.
async fn write_batches(
    registry: Weak<Registry>,
    mut writes: mpsc::UnboundedReceiver<(Write, Reply)>,
) {
    while let Some(first) = writes.recv().await {
        let mut queued = vec![first];
        while let Ok(next) = writes.try_recv() {
            queued.push(next);
        }
        let Some(registry) = registry.upgrade() else {
            return;
        };
        registry.run(queued).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_claims_each_instance_and_service_once() {
        let mut batch = Batch::default();
        assert!(batch.claim("a", "1"));
        assert!(batch.claim("a", "2"));
        assert!(!batch.claim("a", "1"), "the same instance twice");
        assert!(
            !batch.claim_service("a"),
            "a service one of whose instances is in it"
        );
        assert!(batch.claim_service("b"));
        assert!(
            !batch.claim("b", "1"),
            "an instance of a service removed in it"
        );
        assert!(!batch.claim_service("b"));
        assert!(!batch.claim_all(), "a batch that touched something");
    }

    #[test]
    fn a_batch_claimed_whole_takes_nothing_else() {
        let mut batch = Batch::default();
        assert!(batch.claim_all());
        assert!(!batch.claim("a", "1"));
        assert!(!batch.claim_service("a"));
        assert!(!batch.claim_all());
        assert!(Batch::in_place().claim_all());
    }
}
