//! The memory store: nothing is kept beyond the process. Writes are
//! acknowledged at once; a restart starts empty (but for the static
//! services of the configuration).

use super::{Change, Record, RegistryStore, StoreFuture};

#[derive(Debug, Default, Clone, Copy)]
pub struct MemoryStore;

impl RegistryStore for MemoryStore {
    fn describe(&self) -> String {
        "memory".into()
    }

    fn load(&self) -> StoreFuture<'_, Vec<Record>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }

    fn commit(&self, _: Vec<Change>) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn keeps_anything(&self) -> bool {
        false
    }
}
