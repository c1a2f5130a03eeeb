//! Tests of the NATS broker: encoding round trips without a server, and, against the server
//! `RUSTY_SOCKS_TEST_NATS_URL` names (`#[ignore]`d tests: `cargo test -- --include-ignored`),
//! the shared conformance suite, long and limited histories, and two nodes sharing
//! publications and presence. Each run uses a fresh prefix and deletes what it created.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;

use super::history::{decode_limits, encode_limits};
use super::{Names, NatsBroker, NatsOptions, token};
use crate::broker::conformance::{self, Event, Recorder, json};
use crate::broker::history::HistoryLimits;
use crate::broker::{Broker, BrokerError, ClientInfo, HistoryPage, PublishRequest};
use crate::types::StreamPosition;

/// The NATS server the tests run against; a test that needs it and runs without it fails (the
/// tests that need it are `#[ignore]`d, so a plain `cargo test` lists them as ignored).
fn url() -> String {
    std::env::var("RUSTY_SOCKS_TEST_NATS_URL").unwrap_or_else(|_| {
        panic!(
            "RUSTY_SOCKS_TEST_NATS_URL is not set: this test needs NATS with JetStream, \
             e.g. RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222"
        )
    })
}

/// Options with a fresh prefix, so runs never share a stream.
fn options(url: &str) -> NatsOptions {
    NatsOptions {
        url: url.to_owned(),
        prefix: format!("test{}", &uuid::Uuid::new_v4().simple().to_string()[..10]),
        presence_ttl: Duration::from_secs(3),
        history_max_bytes: 64 << 20,
        idempotency_window: conformance::IDEMPOTENCY_WINDOW,
        timeout: Duration::from_secs(3),
    }
}

async fn connect(options: &NatsOptions, events: Arc<Recorder>) -> Arc<NatsBroker> {
    Arc::new(
        NatsBroker::connect(options.clone(), events)
            .await
            .expect("connect to NATS"),
    )
}

/// Deletes what a run created on the server when dropped, so a failing test does not leave
/// its stream behind either (each reserves JetStream storage; leaked ones end up exhausting
/// it). Dropped inside the test's runtime, which cannot be blocked on: a thread of its own.
/// A node subscribed to `channel`, with what it receives.
async fn subscribed_node(options: &NatsOptions, channel: &str) -> (Arc<NatsBroker>, Arc<Recorder>) {
    let events = Arc::new(Recorder::default());
    let node = connect(options, events.clone()).await;
    node.subscribe(channel).await.expect("subscribe");
    (node, events)
}

/// Two nodes on one NATS, both subscribed to `channel`, each with what it receives.
async fn subscribed_nodes(
    options: &NatsOptions,
    channel: &str,
) -> [(Arc<NatsBroker>, Arc<Recorder>); 2] {
    [
        subscribed_node(options, channel).await,
        subscribed_node(options, channel).await,
    ]
}

struct Cleanup(NatsOptions);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let options = self.0.clone();
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let cleanup = async {
                    let client = async_nats::connect(options.url.as_str()).await.ok()?;
                    let js = jetstream::new(client);
                    let names = Names {
                        prefix: options.prefix.clone(),
                    };
                    let _ = js.delete_stream(names.stream()).await;
                    let _ = js.delete_key_value(names.bucket()).await;
                    let _ = js
                        .delete_key_value(format!("{}_transitions", options.prefix))
                        .await;
                    Some(())
                };
                let _ = tokio::time::timeout(Duration::from_secs(5), cleanup).await;
            });
        })
        .join();
    }
}

fn request(data: &str, size: usize, max_bytes: usize) -> PublishRequest {
    PublishRequest {
        data: json(data),
        client_id: None,
        history: HistoryLimits {
            size,
            ttl: None,
            max_bytes,
        },
        idempotency: None,
    }
}

fn offsets(page: &HistoryPage) -> Vec<u64> {
    page.publications.iter().map(|p| p.offset).collect()
}

#[test]
fn tokens_and_limits_round_trip() {
    assert_eq!(token(""), "_");
    assert!(!token("a.b *>").contains(['.', '*', '>', ' ']));
    for limits in [
        HistoryLimits {
            size: 3,
            ttl: None,
            max_bytes: 10,
        },
        HistoryLimits {
            size: 0,
            ttl: Some(Duration::from_millis(1500)),
            max_bytes: 0,
        },
    ] {
        assert_eq!(decode_limits(&encode_limits(limits)), Ok(limits));
    }
    assert!(decode_limits("1 2").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn nats_broker_passes_the_conformance_suite() {
    let url = url();
    let options = options(&url);
    let _cleanup = Cleanup(options.clone());
    conformance::run_all(|events| {
        let options = options.clone();
        async move {
            let broker = NatsBroker::connect(options, events).await;
            Arc::new(broker.expect("connect to NATS")) as Arc<dyn Broker>
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn long_histories_byte_limits_and_empty_histories() {
    let url = url();
    let options = options(&url);
    let _cleanup = Cleanup(options.clone());
    let broker = connect(&options, Arc::new(Recorder::default())).await;
    let c = "long.*>";
    for n in 1..=50 {
        let position = broker
            .publish(c, request(&n.to_string(), 40, 1 << 20))
            .await;
        assert_eq!(position.expect("publish").position.offset, n);
    }
    let all = broker.history(c, None, 100).await.expect("history");
    assert_eq!(
        offsets(&all),
        (11..=50).collect::<Vec<_>>(),
        "read through a consumer"
    );
    assert_eq!(all.publications[0].data.get(), "11");
    let since = broker.history(c, Some(20), 5).await.expect("history");
    assert_eq!(offsets(&since), vec![21, 22, 23, 24, 25]);
    let recent = broker
        .history(c, Some(45), usize::MAX)
        .await
        .expect("history");
    assert_eq!(offsets(&recent), vec![46, 47, 48, 49, 50], "read backwards");

    let b = "bytes";
    for data in ["11", "22", "33", "123456"] {
        broker
            .publish(b, request(data, 10, 5))
            .await
            .expect("publish");
    }
    let page = broker.history(b, None, 10).await.expect("history");
    assert_eq!(page.position.offset, 4);
    assert_eq!(
        offsets(&page),
        vec![2, 3],
        "5 bytes at most; oversized never kept"
    );

    let z = "size zero";
    broker
        .publish(z, request("1", 0, 100))
        .await
        .expect("publish");
    let page = broker.history(z, None, 10).await.expect("history");
    assert_eq!((page.position.offset, page.publications.len()), (1, 0));

    let empty = broker.history("empty", None, 10).await.expect("history");
    let again = broker.history("empty", None, 10).await.expect("history");
    assert_eq!(empty.position, StreamPosition::start());
    assert_eq!(empty.position, again.position, "the same for every read");
    let first = broker
        .publish("empty", request("1", 10, 100))
        .await
        .expect("publish")
        .position;
    assert_eq!(first.offset, 1);
    assert!(
        !first.epoch.is_empty(),
        "the first publication starts an epoch"
    );
}

/// Messages and consumers of the history stream and the presence bucket's stream.
async fn stored(js: &jetstream::Context, names: &Names) -> (u64, usize) {
    let mut total = (0, 0);
    for name in [names.stream(), format!("KV_{}", names.bucket())] {
        let mut stream = js.get_stream(&name).await.expect("stream");
        let info = stream.info().await.expect("stream info");
        total.0 += info.state.messages;
        total.1 += info.state.consumer_count;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn reading_a_never_published_channel_stores_nothing() {
    let url = url();
    let options = options(&url);
    let _cleanup = Cleanup(options.clone());
    let broker = connect(&options, Arc::new(Recorder::default())).await;
    let js = jetstream::new(async_nats::connect(url.as_str()).await.expect("connect"));
    let names = Names {
        prefix: options.prefix.clone(),
    };
    assert_eq!(stored(&js, &names).await, (0, 0), "a fresh prefix");
    // Many channels, every kind of read, each more than once.
    for n in 0..30 {
        let c = format!("never published {n}");
        for since in [None, Some(0), Some(5), None] {
            let page = broker.history(&c, since, 10).await.expect("history");
            assert_eq!(page.position, StreamPosition::start());
        }
        assert!(broker.presence(&c).await.expect("presence").is_empty());
        assert!(broker.presence(&c).await.expect("presence").is_empty());
    }
    let c = "never published";
    assert_eq!(
        stored(&js, &names).await,
        (0, 0),
        "no message (no epoch marker), no consumer"
    );
    broker.subscribe(c).await.expect("subscribe");
    let (messages, consumers) = stored(&js, &names).await;
    assert_eq!(messages, 0, "subscribing writes nothing");
    assert_eq!(consumers, 1, "the live feed's consumer, while subscribed");
    broker.unsubscribe(c).await.expect("unsubscribe");
    let mut after = stored(&js, &names).await;
    for _ in 0..50 {
        if after == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = stored(&js, &names).await;
    }
    assert_eq!(
        after,
        (0, 0),
        "the feed's consumer is deleted at unsubscribe"
    );
    // What is counted does show a publication.
    broker
        .publish(c, request("1", 10, 100))
        .await
        .expect("publish");
    assert_eq!(stored(&js, &names).await.0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn two_nodes_share_publications_and_presence() {
    let options = options(&url());
    let _cleanup = Cleanup(options.clone());
    let c = "shared room.>";
    let [(a, events_a), (b, events_b)] = subscribed_nodes(&options, c).await;
    let tasks: Vec<_> = [&a, &b]
        .into_iter()
        .map(|node| {
            let node = Arc::clone(node);
            tokio::spawn(async move {
                for n in 0..30 {
                    node.publish(c, request(&n.to_string(), 100, 1 << 20))
                        .await
                        .expect("publish");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("publisher");
    }
    let expected: Vec<Event> = (1..=60).map(|n| Event::Publication(c.into(), n)).collect();
    assert_eq!(
        events_a.wait_for(c, 60).await,
        expected,
        "in order, exactly once"
    );
    assert_eq!(
        events_b.wait_for(c, 60).await,
        expected,
        "in order, exactly once"
    );

    let alice = ClientInfo {
        client_id: uuid::Uuid::new_v4(),
        user: Some("alice".into()),
        info: None,
    };
    let bob = ClientInfo {
        client_id: uuid::Uuid::new_v4(),
        user: Some("bob".into()),
        info: None,
    };
    a.add_presence(c, alice.clone()).await.expect("presence");
    b.add_presence(c, bob.clone()).await.expect("presence");
    for node in [&a, &b] {
        let mut present = node.presence(c).await.expect("presence");
        present.sort_by_key(|client| client.user.clone());
        assert_eq!(present, vec![alice.clone(), bob.clone()]);
    }
    a.publish_join(c, alice.clone()).await.expect("join");
    let got = events_b.wait_for(c, 61).await;
    assert_eq!(got.last(), Some(&Event::Join(c.into(), alice.client_id)));

    // Node b dies without removing its entry: it expires; a's own is refreshed.
    drop(b);
    tokio::time::sleep(options.presence_ttl + Duration::from_secs(2)).await;
    assert_eq!(a.presence(c).await.expect("presence"), vec![alice]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn a_pipeline_reaches_every_node_as_one_batch_in_order() {
    let options = options(&url());
    let _cleanup = Cleanup(options.clone());
    let c = "pipelined";
    let [(a, events_a), (_b, events_b)] = subscribed_nodes(&options, c).await;
    crate::broker::cluster_cases::pipelines_reach_every_node_as_one_batch(
        a.as_ref(),
        &[&events_a, &events_b],
        c,
    )
    .await;
}

/// Publishes `from..=to` (each its own number) on `c` as one pipeline; the offsets given.
async fn pipeline(node: &NatsBroker, c: &str, from: u64, to: u64) -> Vec<u64> {
    let requests = (from..=to)
        .map(|n| request(&n.to_string(), 100, 1 << 20))
        .collect();
    let published = node.publish_batch(c, requests).await.expect("pipeline");
    published
        .into_iter()
        .map(|p| p.expect("publish").position.offset)
        .collect()
}

/// A pipeline sent whole on the prediction that its channel still has the stream alone (its
/// previous pipeline found so), where the stream moved on meanwhile: by another channel, then
/// by another node on the same channel. Each time nothing of it is stored twice, offsets
/// follow on, and `Rs-Prev` still links every publication to the one before it (a short
/// history read follows it). Every node gets every publication once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn a_predicted_pipeline_that_finds_the_stream_moved_is_stored_once_in_order() {
    let options = options(&url());
    let _cleanup = Cleanup(options.clone());
    let c = "predicted";
    let [(a, events_a), (b, events_b)] = subscribed_nodes(&options, c).await;
    let one = a.publish(c, request("1", 100, 1 << 20)).await;
    assert_eq!(one.expect("publish").position.offset, 1);
    // Confirmed (first ack awaited), and found the stream the channel's alone.
    assert_eq!(pipeline(&a, c, 2, 5).await, [2, 3, 4, 5]);
    // Predicted, and right.
    assert_eq!(pipeline(&a, c, 6, 9).await, [6, 7, 8, 9]);
    a.publish("elsewhere", request("0", 100, 1 << 20))
        .await
        .expect("publish elsewhere");
    // Predicted, refused whole, sent again confirmed.
    assert_eq!(pipeline(&a, c, 10, 13).await, [10, 11, 12, 13]);
    assert_eq!(pipeline(&a, c, 14, 17).await, [14, 15, 16, 17]);
    let by_b = b.publish(c, request("18", 100, 1 << 20)).await;
    assert_eq!(by_b.expect("publish").position.offset, 18);
    // Predicted on a head another node moved past: refused, then published one by one.
    assert_eq!(pipeline(&a, c, 19, 22).await, [19, 20, 21, 22]);
    let page = b.history(c, Some(6), 16).await.expect("history");
    assert_eq!(offsets(&page), (7..=22).collect::<Vec<_>>());
    let data: Vec<String> = page
        .publications
        .iter()
        .map(|p| p.data.get().to_owned())
        .collect();
    let numbers: Vec<String> = (7..=22).map(|n: u64| n.to_string()).collect();
    assert_eq!(data, numbers, "each stored once, in order");
    let expected: Vec<Event> = (1..=22).map(|n| Event::Publication(c.into(), n)).collect();
    for events in [&events_a, &events_b] {
        assert_eq!(events.wait_for_publications(c, 22).await, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn an_announced_pipeline_that_never_completes_is_not_waited_for_long() {
    let url = url();
    let options = options(&url);
    let _cleanup = Cleanup(options.clone());
    let c = "cut short";
    let (node, events) = subscribed_node(&options, c).await;
    // The first append of a pipeline of five, whose other four never come (as if its
    // publisher died right after the first ack).
    let js = jetstream::new(
        async_nats::connect(url.as_str())
            .await
            .expect("connect to NATS"),
    );
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in [
        ("Rs-Epoch", "e1"),
        ("Rs-Offset", "1"),
        ("Rs-Prev", "0"),
        ("Rs-Limits", "100 1048576 -"),
        ("Rs-Run", "5"),
    ] {
        headers.insert(name, value);
    }
    let names = Names {
        prefix: options.prefix.clone(),
    };
    let sent = std::time::Instant::now();
    js.publish_with_headers(names.history(c), headers, "1".into())
        .await
        .expect("append")
        .await
        .expect("stored");
    assert_eq!(
        events.wait_for_publications(c, 1).await,
        [Event::Publication(c.into(), 1)]
    );
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "held for {:?}",
        sent.elapsed()
    );
    // What follows is delivered as usual, in order.
    let published = node
        .publish(c, request("2", 100, 1 << 20))
        .await
        .expect("publish");
    assert_eq!(published.position.offset, 2);
    assert_eq!(
        events.wait_for_publications(c, 2).await,
        [
            Event::Publication(c.into(), 1),
            Event::Publication(c.into(), 2)
        ]
    );
}

#[tokio::test]
async fn an_unreachable_server_fails_fast() {
    let started = std::time::Instant::now();
    let mut options = options("nats://127.0.0.1:1");
    options.url = "nats://127.0.0.1:1".into();
    let result = NatsBroker::connect(options, Arc::new(Recorder::default())).await;
    assert!(
        matches!(&result, Err(BrokerError::Connect { url, .. }) if url == "nats://127.0.0.1:1"),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
}

/// Brokers of one cluster on `options`' prefix, with presence TTL `ttl`.
fn cluster(
    options: NatsOptions,
    ttl: Duration,
) -> impl Fn(Arc<dyn crate::broker::BrokerEvents>) -> crate::broker::cluster_cases::Building {
    move |events| {
        let options = NatsOptions {
            presence_ttl: ttl,
            ..options.clone()
        };
        Box::pin(async move {
            let broker = NatsBroker::connect(options, events).await;
            Arc::new(broker.expect("connect to NATS")) as Arc<dyn Broker>
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn transitions_are_decided_once_across_nodes() {
    let options = options(&url());
    let _cleanup = Cleanup(options.clone());
    let make = cluster(options, Duration::from_secs(3));
    crate::broker::cluster_cases::transitions_across_nodes(&make).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn a_dead_nodes_transitions_are_claimed_by_one_survivor() {
    let options = options(&url());
    let _cleanup = Cleanup(options.clone());
    let ttl = Duration::from_secs(1);
    let make = cluster(options, ttl);
    crate::broker::cluster_cases::dead_nodes_are_claimed_by_one_survivor(&make, ttl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn a_dead_node_with_more_holdings_than_a_sweep_returns_has_all_released() {
    let options = options(&url());
    let _cleanup = Cleanup(options.clone());
    let ttl = Duration::from_secs(1);
    let make = cluster(options, ttl);
    let paged =
        crate::broker::cluster_cases::a_dead_nodes_many_holdings_are_all_released(&make, ttl).await;
    assert!(paged, "300 pending transitions take more than one sweep");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn a_node_declared_dead_tracks_again() {
    let options = options(&url());
    let _cleanup = Cleanup(options.clone());
    let ttl = Duration::from_secs(1);
    let make = cluster(options, ttl);
    crate::broker::cluster_cases::a_node_declared_dead_rejoins(&make, ttl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn a_repeated_track_returns_the_same_decision() {
    let options = options(&url());
    let _cleanup = Cleanup(options.clone());
    let make = cluster(options, Duration::from_secs(3));
    crate::broker::cluster_cases::a_repeated_call_returns_the_same_decision(&make).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn a_dead_claimers_pending_transitions_are_taken_over() {
    let options = options(&url());
    let _cleanup = Cleanup(options.clone());
    let ttl = Duration::from_secs(1);
    let make = cluster(options, ttl);
    crate::broker::cluster_cases::a_dead_claimers_pending_transitions_are_taken_over(&make, ttl)
        .await;
}
