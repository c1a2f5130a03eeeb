//! Tests of the Redis broker against a real Redis (`RUSTY_SOCKS_TEST_REDIS_URL`).

use super::*;
use crate::broker::conformance::{self, Event, Recorder};

/// The Redis the tests run against; a test that needs it and runs without it fails (the
/// tests that need it are `#[ignore]`d, so a plain `cargo test` lists them as ignored).
fn url() -> String {
    std::env::var("RUSTY_SOCKS_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!(
            "RUSTY_SOCKS_TEST_REDIS_URL is not set: this test needs Redis, \
             e.g. RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379"
        )
    })
}

fn options(url: &str, prefix: &str) -> RedisOptions {
    RedisOptions {
        url: url.to_owned(),
        prefix: prefix.to_owned(),
        presence_ttl: Duration::from_secs(3),
        timeout: Duration::from_secs(3),
    }
}

fn prefix() -> String {
    format!("rstest{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

#[tokio::test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn redis_broker_passes_the_conformance_suite() {
    let url = url();
    let prefix = prefix();
    conformance::run_all(|events| {
        let options = options(&url, &prefix);
        async move {
            let broker = RedisBroker::connect(options, events)
                .await
                .expect("redis reachable");
            Arc::new(broker) as Arc<dyn Broker>
        }
    })
    .await;
}

#[tokio::test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn an_idempotency_key_never_names_an_offset_of_another_epoch() {
    let (url, prefix) = (url(), prefix());
    let broker = RedisBroker::connect(options(&url, &prefix), Arc::new(Recorder::default()))
        .await
        .expect("redis");
    let keyed = || PublishRequest {
        idempotency: Some(crate::broker::Idempotency {
            key: "k".into(),
            window: Duration::from_secs(60),
        }),
        ..conformance::request_for_tests("1")
    };
    let first = broker.publish("c", keyed()).await.expect("publish");
    // The channel's stream is lost (its keys expired, say) while the key is remembered.
    let (_lease, mut conn) = broker.shared.commands.get().await.expect("connection");
    let meta = broker.shared.key("c", "meta");
    redis::AsyncCommands::del::<_, i64>(&mut conn, &meta)
        .await
        .expect("del");
    let again = broker.publish("c", keyed()).await.expect("publish");
    assert!(!again.duplicate, "a key of the old epoch is not honoured");
    assert_ne!(again.position.epoch, first.position.epoch);
    assert_eq!(again.position.offset, 1);
    let retry = broker.publish("c", keyed()).await.expect("publish");
    assert!(
        retry.duplicate,
        "the key now names the new epoch's publication"
    );
    assert_eq!(retry.position, again.position);
}

#[tokio::test]
async fn an_unreachable_redis_stops_startup_with_a_clear_error() {
    let started = std::time::Instant::now();
    let err = RedisBroker::connect(
        options("redis://127.0.0.1:1", "x"),
        Arc::new(Recorder::default()),
    )
    .await
    .expect_err("nothing listens on port 1");
    assert!(matches!(err, BrokerError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("RUSTY_SOCKS_BROKER"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn two_nodes_share_publications_and_presence() {
    let url = url();
    let prefix = prefix();
    let a_events = Arc::new(Recorder::default());
    let b_events = Arc::new(Recorder::default());
    let a = RedisBroker::connect(options(&url, &prefix), a_events.clone())
        .await
        .expect("redis");
    let b = RedisBroker::connect(options(&url, &prefix), b_events.clone())
        .await
        .expect("redis");
    a.subscribe("room").await.expect("subscribe");
    b.subscribe("room").await.expect("subscribe");
    for n in 1..=20 {
        let broker = if n % 2 == 0 { &a } else { &b };
        let request = conformance::request_for_tests(&n.to_string());
        broker.publish("room", request).await.expect("publish");
    }
    let expected: Vec<Event> = (1..=20)
        .map(|n| Event::Publication("room".into(), n))
        .collect();
    assert_eq!(a_events.wait_for("room", 20).await, expected);
    assert_eq!(b_events.wait_for("room", 20).await, expected);
    let ann = ClientInfo {
        client_id: uuid::Uuid::new_v4(),
        user: Some("ann".into()),
        info: None,
    };
    a.add_presence("room", ann.clone()).await.expect("presence");
    assert_eq!(b.presence("room").await.expect("presence"), vec![ann]);
}

/// A pipeline is announced ahead of its first publication (`r|<n>|<offset>`), so every
/// subscribed node hands the pipeline to its subscribers in one go, even after a quiet spell
/// (which alone would deliver the first publication at once and the rest when they arrived),
/// and even when Redis takes milliseconds to run the scripts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn a_pipeline_reaches_every_node_as_one_batch_in_order() {
    let (url, prefix) = (url(), prefix());
    let (events_a, events_b) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
    let a = RedisBroker::connect(options(&url, &prefix), events_a.clone())
        .await
        .expect("redis");
    let b = RedisBroker::connect(options(&url, &prefix), events_b.clone())
        .await
        .expect("redis");
    let c = "pipelined";
    a.subscribe(c).await.expect("subscribe");
    b.subscribe(c).await.expect("subscribe");
    // What a node of an earlier version would receive: the publications as before, each
    // pipeline's first preceded by its announcement.
    let client = redis::Client::open(url.as_str()).expect("redis url");
    let mut raw = client.get_async_pubsub().await.expect("pubsub");
    raw.subscribe(format!("{prefix}:live:{c}"))
        .await
        .expect("subscribe");
    crate::broker::cluster_cases::pipelines_reach_every_node_as_one_batch(
        &a,
        &[&events_a, &events_b],
        c,
    )
    .await;
    let mut messages = raw.on_message();
    let mut kinds = Vec::new();
    while kinds.len() < 1 + 3 * 17 {
        let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .expect("a message within 5 s")
            .expect("pubsub open");
        let text = String::from_utf8(message.get_payload_bytes().to_vec()).expect("UTF-8");
        let (kind, rest) = text.split_once('|').expect("a kind");
        kinds.push(match kind {
            "r" => rest.to_owned(),
            "p" => rest.split('|').nth(1).expect("offset").to_owned(),
            other => panic!("kind {other}: {text}"),
        });
    }
    // The case's first publication alone, then its three pipelines of 16.
    let mut want = vec!["1".to_owned()];
    for first in [2, 18, 34] {
        want.push(format!("16|{first}"));
        want.extend((first..first + 16).map(|o| o.to_string()));
    }
    assert_eq!(
        kinds, want,
        "announcement right before each pipeline's first `p|`"
    );
}

#[tokio::test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn reading_a_never_published_channel_creates_no_keys() {
    let (url, prefix) = (url(), prefix());
    let broker = RedisBroker::connect(options(&url, &prefix), Arc::new(Recorder::default()))
        .await
        .expect("redis");
    let keys = || async {
        let (_lease, mut conn) = broker.shared.commands.get().await.expect("connection");
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut conn)
            .await
            .expect("KEYS");
        keys.sort();
        keys
    };
    assert!(keys().await.is_empty(), "a fresh prefix");
    // Many channels, every kind of read, each more than once.
    for n in 0..50 {
        let c = format!("never published {n}");
        for since in [None, Some(0), Some(5), None] {
            let page = broker.history(&c, since, 10).await.expect("history");
            assert_eq!(page.position, StreamPosition::start());
            assert!(page.publications.is_empty());
        }
        assert!(broker.presence(&c).await.expect("presence").is_empty());
        assert!(broker.presence(&c).await.expect("presence").is_empty());
    }
    assert_eq!(keys().await, Vec::<String>::new(), "reads created keys");
    let c = "never published";
    broker.subscribe(c).await.expect("subscribe");
    assert_eq!(
        broker.history(c, None, 0).await.expect("history").position,
        StreamPosition::start()
    );
    broker.unsubscribe(c).await.expect("unsubscribe");
    assert_eq!(keys().await, Vec::<String>::new(), "reads created keys");
    // What is counted does show a publication.
    broker
        .publish(c, conformance::request_for_tests("1"))
        .await
        .expect("publish");
    assert!(!keys().await.is_empty());
    let (_lease, mut conn) = broker.shared.commands.get().await.expect("connection");
    for key in keys().await {
        let _: Result<i64, _> = redis::AsyncCommands::del(&mut conn, &key).await;
    }
}

/// Brokers of one cluster on `prefix` whose presence TTL is `ttl`.
fn cluster(
    prefix: String,
    ttl: Duration,
) -> impl Fn(Arc<dyn BrokerEvents>) -> crate::broker::cluster_cases::Building {
    let url = url();
    move |events| {
        let options = RedisOptions {
            presence_ttl: ttl,
            ..options(&url, &prefix)
        };
        Box::pin(async move {
            let broker = RedisBroker::connect(options, events)
                .await
                .expect("redis reachable");
            Arc::new(broker) as Arc<dyn Broker>
        })
    }
}

#[tokio::test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn transitions_are_decided_once_across_nodes() {
    let make = cluster(prefix(), Duration::from_secs(3));
    crate::broker::cluster_cases::transitions_across_nodes(&make).await;
}

#[tokio::test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn a_dead_node_with_many_holdings_has_all_released() {
    let ttl = Duration::from_secs(1);
    let make = cluster(prefix(), ttl);
    crate::broker::cluster_cases::a_dead_nodes_many_holdings_are_all_released(&make, ttl).await;
}

#[tokio::test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn a_dead_nodes_transitions_are_claimed_by_one_survivor() {
    let ttl = Duration::from_secs(1);
    let make = cluster(prefix(), ttl);
    crate::broker::cluster_cases::dead_nodes_are_claimed_by_one_survivor(&make, ttl).await;
}

#[tokio::test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn a_node_declared_dead_tracks_again() {
    let ttl = Duration::from_secs(1);
    let make = cluster(prefix(), ttl);
    crate::broker::cluster_cases::a_node_declared_dead_rejoins(&make, ttl).await;
}

#[tokio::test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn a_repeated_track_returns_the_same_decision() {
    let make = cluster(prefix(), Duration::from_secs(3));
    crate::broker::cluster_cases::a_repeated_call_returns_the_same_decision(&make).await;
}

#[tokio::test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn a_dead_claimers_pending_transitions_are_taken_over() {
    let ttl = Duration::from_secs(1);
    let make = cluster(prefix(), ttl);
    crate::broker::cluster_cases::a_dead_claimers_pending_transitions_are_taken_over(&make, ttl)
        .await;
}
