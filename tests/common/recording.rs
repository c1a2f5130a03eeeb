//! A `TransitionSink` that records what a node decided, for tests that look at transitions
//! without the webhook path.

use std::sync::Mutex;
use std::time::Duration;

use rusty_socks::broker::{Transition, TransitionSink};

use super::WAIT;

/// One transition as `(event, channel, user)`.
pub type Event = (String, String, Option<String>);

/// `(event, channel, user)` from string slices, to compare with what was recorded.
pub fn ev(name: &str, channel: &str, user: Option<&str>) -> Event {
    (name.to_owned(), channel.to_owned(), user.map(str::to_owned))
}

/// Every transition handed to the sink, in order.
#[derive(Default)]
pub struct Recording(Mutex<Vec<Transition>>);

impl TransitionSink for Recording {
    fn on_transition(&self, t: Transition) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(t);
    }
}

impl Recording {
    /// Everything recorded so far.
    pub fn all(&self) -> Vec<Event> {
        self.transitions()
            .into_iter()
            .map(|t| {
                (
                    t.kind.name().to_owned(),
                    t.channel.to_string(),
                    t.user.map(|u| u.to_string()),
                )
            })
            .collect()
    }

    /// Everything recorded so far, whole (`seq` and id included).
    pub fn transitions(&self) -> Vec<Transition> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Forgets everything recorded so far.
    pub fn clear(&self) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// Waits (bounded) until `count` transitions were recorded, and returns them.
    pub async fn wait_for(&self, count: usize) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let all = self.all();
            if all.len() >= count {
                return all;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected {count} transitions, got {all:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
