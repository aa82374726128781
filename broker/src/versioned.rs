//! A value replaced as a whole, rarely, and read on the hot path: readers
//! keep their own `Arc` of it and look at a version number per use (one
//! atomic load), taking the new value only when it changed. What the routing
//! rules and the topic layout are published through.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The published value and its version.
#[derive(Debug, Default)]
pub struct Versioned<T> {
    version: AtomicU64,
    value: Mutex<Arc<T>>,
}

impl<T> Versioned<T> {
    /// A table holding `value` at version 0.
    pub fn new(value: T) -> Versioned<T> {
        Versioned {
            version: AtomicU64::new(0),
            value: Mutex::new(Arc::new(value)),
        }
    }

    /// Installs a new value; views take it at their next use.
    pub fn replace(&self, value: T) {
        *self.value.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
        self.version.fetch_add(1, Ordering::Release);
    }

    /// The current value.
    pub fn load(&self) -> Arc<T> {
        self.value.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A reader's view, holding the current value.
    pub fn view(self: &Arc<Self>) -> View<T> {
        let seen = self.version.load(Ordering::Acquire);
        View {
            value: self.load(),
            table: self.clone(),
            seen,
        }
    }
}

/// What one reader holds: the value it last took and its version.
#[derive(Debug)]
pub struct View<T> {
    table: Arc<Versioned<T>>,
    seen: u64,
    value: Arc<T>,
}

impl<T> Clone for View<T> {
    fn clone(&self) -> Self {
        View {
            table: self.table.clone(),
            seen: self.seen,
            value: self.value.clone(),
        }
    }
}

impl<T> View<T> {
    /// Whether a newer value was published since this view took its own.
    #[inline]
    pub fn changed(&self) -> bool {
        self.table.version.load(Ordering::Acquire) != self.seen
    }

    /// Takes the newest value if it changed; returns whether it did.
    #[inline]
    pub fn refresh(&mut self) -> bool {
        let v = self.table.version.load(Ordering::Acquire);
        if v == self.seen {
            return false;
        }
        // The version is read before the value: a value replaced in between
        // is newer than `v`, and the next refresh takes it again.
        self.value = self.table.load();
        self.seen = v;
        true
    }

    /// Makes [`changed`](Self::changed) true until the next refresh: for a
    /// reader that must act on the current value once (route what it set
    /// up before it had a view).
    pub fn mark_stale(&mut self) {
        self.seen = u64::MAX;
    }

    /// The value this view holds (call [`refresh`](Self::refresh) first for
    /// the newest).
    #[inline]
    pub fn get(&self) -> &T {
        &self.value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_takes_a_replacement_at_its_next_refresh_only() {
        let t = Arc::new(Versioned::new(1));
        let mut v = t.view();
        assert!(!v.refresh());
        t.replace(2);
        assert!(v.changed());
        assert_eq!(*v.get(), 1, "held until refreshed");
        assert!(v.refresh());
        assert_eq!(*v.get(), 2);
        assert!(!v.changed());
    }
}
