//! The typed options each layer below takes, built from the settings: a layer never sees the
//! whole [`Config`], only what it needs, in its own terms.

use super::{BrokerUrl, Config};
use crate::auth::KeyOptions;
use crate::broker::durable::DurableOptions;
use crate::broker::{BrokerChoice, BrokerError};

impl Config {
    /// The keys and policy of token verification.
    pub fn key_options(&self) -> KeyOptions {
        KeyOptions {
            jwt_secret: self.jwt_secret.clone(),
            jwt_public_key: self.jwt_public_key.clone(),
            jwks: self.jwt_jwks.clone(),
            jwks_refresh: self.jwt_jwks_refresh,
            jwks_cooldown: self.jwt_jwks_cooldown,
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
            require_exp: self.jwt_require_exp,
            allow_anonymous: self.allow_anonymous,
        }
    }

    /// The broker to run, with its options. Fails only for a broker this build lacks (which
    /// reading the settings already refuses).
    pub fn broker_choice(&self) -> Result<BrokerChoice, BrokerError> {
        match &self.broker {
            BrokerUrl::Memory => Ok(BrokerChoice::Memory {
                history_total_bytes: self.history_total_bytes,
                durable: self.data_dir.as_ref().map(|dir| DurableOptions {
                    dir: dir.clone(),
                    fsync: self.fsync,
                    max_bytes: self.data_max_bytes,
                    segment_bytes: self.data_segment_bytes,
                }),
            }),
            #[cfg(feature = "redis")]
            BrokerUrl::Redis(url) => Ok(BrokerChoice::Redis(crate::broker::redis::RedisOptions {
                url: url.clone(),
                prefix: self.broker_prefix.clone(),
                presence_ttl: self.presence_ttl,
                timeout: self.broker_timeout,
            })),
            #[cfg(feature = "nats")]
            BrokerUrl::Nats(url) => Ok(BrokerChoice::Nats(crate::broker::nats::NatsOptions {
                url: url.clone(),
                prefix: self.broker_prefix.clone(),
                presence_ttl: self.presence_ttl,
                history_max_bytes: self.history_total_bytes,
                idempotency_window: self.idempotency_window,
                timeout: self.broker_timeout,
            })),
            #[allow(unreachable_patterns)]
            other => Err(BrokerError::Connect {
                url: format!("{other:?}"),
                reason: "this build does not include that broker".into(),
            }),
        }
    }
}
