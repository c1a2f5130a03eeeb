//! Several publishes on one channel as one pipeline: every `EVALSHA` of the publish script
//! is written back to back on the command connection, then the answers are read.
//!
//! Why: a publish is a round trip to Redis. A client that sends many messages at once would
//! otherwise publish them one round trip after another, and each would reach the other
//! nodes' subscriptions alone, so every subscriber there is woken (and written to) once per
//! message. Pipelined, they arrive close together, and the first one's script announces them
//! right before its publication (`r|<n>|<offset>`, [`crate::broker::wire`]), so the receiving
//! node delivers them in one batch ([`crate::broker::batch`]) even when Redis takes several
//! milliseconds to run the scripts (up to the batch's `RUN_WAIT`). Redis runs the scripts in
//! the order they were sent, so offsets follow the requests' order.

use redis::{ErrorKind, RedisResult, ServerErrorKind};

use super::{PublishReply, Shared, published, unavailable};
use crate::broker::{BrokerError, PublishRequest, Published};

fn no_script(reply: &RedisResult<PublishReply>) -> bool {
    matches!(reply, Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript))
}

impl Shared {
    /// See the module docs. One result per request, in order; a request the script refused
    /// fails alone. The pipeline as a whole failing (the connection, the deadline) fails
    /// every request.
    pub(super) async fn publish_pipelined(
        &self,
        channel: &str,
        requests: Vec<PublishRequest>,
    ) -> Result<Vec<Result<Published, BrokerError>>, BrokerError> {
        let replies = self.pipeline(channel, &requests).await?;
        // Redis lost its scripts (a restart, `SCRIPT FLUSH`): load it and send again what was
        // refused for that, if that is everything from some request on (those ran nothing,
        // and nothing after them ran either, so sending them again keeps the order). A
        // refusal followed by a success (another node loaded the script meanwhile) is
        // reported as a failure instead: sending it again would publish it out of order.
        let mut retried = None;
        if let Some(first) = replies.iter().position(no_script)
            && replies[first..].iter().all(no_script)
        {
            let again = match self.load_script().await {
                Ok(()) => self.pipeline(channel, &requests[first..]).await,
                Err(err) => Err(err),
            };
            retried = Some((first, again));
        }
        let mut results: Vec<Result<Published, BrokerError>> = replies
            .into_iter()
            .map(|reply| reply.map(published).map_err(unavailable))
            .collect();
        match retried {
            Some((first, Ok(again))) => {
                results.truncate(first);
                results.extend(
                    again
                        .into_iter()
                        .map(|reply| reply.map(published).map_err(unavailable)),
                );
            }
            // Those before `first` were published: only the ones sent again failed.
            Some((first, Err(err))) => {
                let message = err.to_string();
                for result in &mut results[first..] {
                    *result = Err(BrokerError::Unavailable(message.clone()));
                }
            }
            None => {}
        }
        Ok(results)
    }

    /// Loads the publish script (Redis lost it: a restart, `SCRIPT FLUSH`).
    async fn load_script(&self) -> Result<(), BrokerError> {
        let (lease, mut conn) = self.commands.get().await?;
        lease.finish(self.publish.prepare_invoke().load_async(&mut conn).await)?;
        Ok(())
    }

    /// Sends `requests` as one pipeline and reads every answer (each its own result).
    async fn pipeline(
        &self,
        channel: &str,
        requests: &[PublishRequest],
    ) -> Result<Vec<RedisResult<PublishReply>>, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        // The first one's script announces how many were sent together, so receiving nodes
        // hold its publication for the rest.
        let mut run = requests.len();
        for request in requests {
            pipe.invoke_script(&self.publish_invocation(channel, request, run));
            run = 1;
        }
        let (lease, mut conn) = self.commands.get().await?;
        let replies: Vec<RedisResult<PublishReply>> =
            lease.finish(pipe.query_async(&mut conn).await)?;
        if replies.len() != requests.len() {
            return Err(BrokerError::Unavailable(format!(
                "redis: {} answers to {} publishes",
                replies.len(),
                requests.len()
            )));
        }
        Ok(replies)
    }
}
