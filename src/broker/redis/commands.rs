//! The command connection: one multiplexed connection, replaced when it cannot be trusted.
//!
//! A connection whose command timed out, failed with an I/O error, or was abandoned half-way
//! (its future dropped at a caller's deadline) is dropped, and the next command connects
//! afresh (one attempt at a time, under the deadline). That is what makes a silently dead
//! link (a partition, no RST) recover: a reply that never comes is never waited for twice.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;

use super::unavailable;
use crate::broker::BrokerError;

pub(super) struct Commands {
    client: redis::Client,
    timeout: Duration,
    /// The connection in use and its generation (bumped by every new connection).
    current: Mutex<(u64, Option<MultiplexedConnection>)>,
    /// Held while connecting, so concurrent commands wait for one attempt; it holds when
    /// and why the last attempt failed, so those who waited share its outcome instead of
    /// each making an attempt of its own (one deadline after another, in a queue).
    connecting: tokio::sync::Mutex<Option<(Instant, String)>>,
}

/// A connection handed to one command; dropped before [`Lease::finish`], it invalidates the
/// connection (the command was abandoned, its reply may still come).
pub(super) struct Lease<'a> {
    commands: &'a Commands,
    generation: u64,
    finished: bool,
}

impl Lease<'_> {
    /// Maps the command's outcome, invalidating the connection if it cannot be trusted.
    pub(super) fn finish<T>(mut self, outcome: redis::RedisResult<T>) -> Result<T, BrokerError> {
        self.finished = true;
        match outcome {
            Ok(value) => Ok(value),
            Err(err) => {
                if err.is_timeout()
                    || err.is_io_error()
                    || err.is_unrecoverable_error()
                    || err.is_connection_dropped()
                {
                    self.commands.invalidate(self.generation);
                }
                Err(unavailable(err))
            }
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.commands.invalidate(self.generation);
        }
    }
}

impl Commands {
    /// Connects once (failing after `timeout`).
    pub(super) async fn connect(
        client: redis::Client,
        timeout: Duration,
    ) -> Result<Self, redis::RedisError> {
        let commands = Self {
            client,
            timeout,
            current: Mutex::new((0, None)),
            connecting: tokio::sync::Mutex::new(None),
        };
        let connection = commands.open().await?;
        commands.lock().1 = Some(connection);
        Ok(commands)
    }

    fn lock(&self) -> MutexGuard<'_, (u64, Option<MultiplexedConnection>)> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn open(&self) -> Result<MultiplexedConnection, redis::RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        tokio::time::timeout(
            self.timeout,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from(std::io::Error::from(
                std::io::ErrorKind::TimedOut,
            )))
        })
    }

    fn invalidate(&self, generation: u64) {
        let mut current = self.lock();
        if current.0 == generation && current.1.take().is_some() {
            tracing::debug!("redis command connection dropped; the next command reconnects");
        }
    }

    fn leased(&self) -> Option<(Lease<'_>, MultiplexedConnection)> {
        let current = self.lock();
        let connection = current.1.clone()?;
        let lease = Lease {
            commands: self,
            generation: current.0,
            finished: false,
        };
        Some((lease, connection))
    }

    /// A connection for one command, connecting first if there is none.
    pub(super) async fn get(&self) -> Result<(Lease<'_>, MultiplexedConnection), BrokerError> {
        if let Some(leased) = self.leased() {
            return Ok(leased);
        }
        let asked = Instant::now();
        let mut last_failure = self.connecting.lock().await;
        if let Some(leased) = self.leased() {
            return Ok(leased);
        }
        if let Some((at, why)) = last_failure.as_ref()
            && *at >= asked
        {
            // An attempt failed while this command waited for it: that is the answer.
            return Err(BrokerError::Unavailable(format!("redis: {why}")));
        }
        let connection = match self.open().await {
            Ok(connection) => {
                *last_failure = None;
                connection
            }
            Err(err) => {
                *last_failure = Some((Instant::now(), err.to_string()));
                return Err(unavailable(err));
            }
        };
        {
            let mut current = self.lock();
            current.0 += 1;
            current.1 = Some(connection);
        }
        self.leased()
            .ok_or_else(|| BrokerError::Unavailable("redis: connection lost".into()))
    }
}
