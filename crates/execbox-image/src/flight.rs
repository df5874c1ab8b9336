//! Single flight: one task at a time does the work for a key; the others wait for it and then
//! find the work done.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

/// Keyed async mutexes that exist only while someone holds or waits for them.
#[derive(Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// The right to do the work for one key, until dropped.
pub(crate) struct Flight<'a> {
    flights: &'a Flights,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Flights {
    /// Waits until no one else holds `key`, then holds it.
    pub(crate) async fn enter(&self, key: &str) -> Flight<'_> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.to_owned()).or_default().clone()
        };
        let guard = m.lock_owned().await;
        Flight {
            flights: self,
            key: key.to_owned(),
            guard: Some(guard),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut map = self.flights.map.lock().unwrap_or_else(|e| e.into_inner());
        drop(self.guard.take());
        // Only the map's own reference left: no one holds or waits for the key.
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_at_a_time_then_forgotten() {
        let flights = Arc::new(Flights::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (flights, inside, max) = (flights.clone(), inside.clone(), max.clone());
            tasks.push(tokio::spawn(async move {
                let _f = flights.enter("k").await;
                let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(max.load(Ordering::SeqCst), 1);
        assert_eq!(flights.len(), 0);
    }
}
