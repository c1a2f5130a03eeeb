//! Protocol v1 over real sockets: channels, offsets, history, recovery, presence, namespaces.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use rusty_socks::engine::namespace::{NamespaceOptions, SlowPolicy};
use serde_json::{Value, json};

fn with_namespaces(config: &mut rusty_socks::settings::Config) {
    config.namespaces.insert(
        "chat",
        NamespaceOptions {
            history_size: 100,
            join_leave: true,
            ..NamespaceOptions::default()
        },
    );
    config.namespaces.insert(
        "small",
        NamespaceOptions {
            history_size: 10,
            ..NamespaceOptions::default()
        },
    );
    config.namespaces.insert(
        "readonly",
        NamespaceOptions {
            publish: rusty_socks::engine::namespace::Access::Nobody,
            presence: false,
            ..NamespaceOptions::default()
        },
    );
}

#[tokio::test]
async fn publications_reach_subscribers_with_sequential_offsets() {
    let server = TestServer::start(with_namespaces).await;
    let (mut a, _) = v1_client(&server).await;
    let (mut b, b_id) = v1_client(&server).await;
    let sub = call(&mut a, json!({"type":"subscribe","id":1,"channel":"news"})).await;
    assert_eq!(sub["type"], "subscribed");
    assert_eq!(sub["channel"], "news");
    assert_eq!(sub["offset"], 0);
    assert_eq!(sub["recovered"], false);
    assert_eq!(sub["publications"], json!([]));
    assert_eq!(sub["epoch"], "", "no publication yet: no epoch");

    for n in 1..=3u64 {
        let reply = call(
            &mut b,
            json!({"type":"publish","id":format!("p{n}"),"channel":"news","data":{"n":n}}),
        )
        .await;
        assert_eq!(
            reply,
            json!({"type":"published","id":format!("p{n}"),"channel":"news","offset":n})
        );
        let push = recv_json(&mut a).await;
        let epoch = push["epoch"].as_str().unwrap_or_default();
        assert!(
            !epoch.is_empty(),
            "the first publication started an epoch: {push}"
        );
        assert_eq!(
            push,
            json!({"type":"publication","channel":"news","offset":n,"epoch":epoch,"data":{"n":n},"client_id":b_id})
        );
    }
    // The publisher, subscribed too, gets its own publications.
    subscribe(&mut b, "news").await;
    let offset = publish(&mut b, "news", json!("self")).await;
    assert_eq!(offset, 4);
    assert_eq!(recv_json(&mut b).await["data"], "self");
    assert_eq!(recv_json(&mut a).await["offset"], 4);

    let reply = call(
        &mut a,
        json!({"type":"unsubscribe","id":9,"channel":"news"}),
    )
    .await;
    assert_eq!(
        reply,
        json!({"type":"unsubscribed","id":9,"channel":"news"})
    );
    publish(&mut b, "news", json!("after")).await;
    assert_eq!(recv_json(&mut b).await["data"], "after");
    // `a` left: its next frame is the answer to its next command, not a publication.
    let reply = call(&mut a, json!({"type":"presence","id":10,"channel":"news"})).await;
    assert_eq!(reply["type"], "presence");
    server.stop().await;
}

#[tokio::test]
async fn history_returns_the_newest_or_what_follows_a_position() {
    let server = TestServer::start(with_namespaces).await;
    let (mut a, _) = v1_client(&server).await;
    for n in 1..=15 {
        publish(&mut a, "small:h", json!(n)).await;
    }
    let all = call(&mut a, json!({"type":"history","id":1,"channel":"small:h"})).await;
    assert_eq!(all["offset"], 15);
    assert_eq!(
        offsets(&all["publications"]),
        (6..=15).collect::<Vec<_>>(),
        "bounded to 10"
    );
    let newest = call(
        &mut a,
        json!({"type":"history","id":2,"channel":"small:h","limit":2}),
    )
    .await;
    assert_eq!(offsets(&newest["publications"]), vec![14, 15]);
    let since = call(
        &mut a,
        json!({"type":"history","id":3,"channel":"small:h","since":{"offset":12,"epoch":all["epoch"]}}),
    )
    .await;
    assert_eq!(offsets(&since["publications"]), vec![13, 14, 15]);
    assert_eq!(since["publications"][0]["data"], 13);
    assert_eq!(since["complete"], true);
    let trimmed = call(
        &mut a,
        json!({"type":"history","id":4,"channel":"small:h","since":{"offset":2,"epoch":all["epoch"]}}),
    )
    .await;
    assert_eq!(
        trimmed["complete"], false,
        "offsets 3..5 are gone: {trimmed}"
    );
    assert_eq!(
        all.get("complete"),
        None,
        "only replies to `since` say whether they continue"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_missed_50_publications_recovers_exactly_those() {
    let server = TestServer::start(with_namespaces).await;
    let (mut publisher, _) = v1_client(&server).await;
    let (mut reader, _) = v1_client(&server).await;
    subscribe(&mut reader, "chat:room").await;
    for n in 1..=5 {
        publish(&mut publisher, "chat:room", json!(n)).await;
    }
    let mut last = json!(null);
    for _ in 1..=5 {
        last = recv_json(&mut reader).await;
    }
    let epoch = subscribe(&mut publisher, "chat:room").await["epoch"].clone();
    drop(reader);
    // The leave of `reader` reaches the publisher (join_leave is on in `chat`).
    assert_eq!(recv_json(&mut publisher).await["type"], "leave");

    for n in 6..=55 {
        publish(&mut publisher, "chat:room", json!(n)).await;
        assert_eq!(recv_json(&mut publisher).await["offset"], n);
    }
    let (mut back, _) = v1_client(&server).await;
    let sub = call(
        &mut back,
        json!({"type":"subscribe","id":"again","channel":"chat:room","since":{"offset":last["offset"],"epoch":epoch}}),
    )
    .await;
    assert_eq!(sub["recovered"], true, "{sub}");
    assert_eq!(sub["offset"], 55);
    assert_eq!(offsets(&sub["publications"]), (6..=55).collect::<Vec<_>>());
    assert_eq!(sub["publications"][49]["data"], 55);
    assert_eq!(recv_json(&mut publisher).await["type"], "join");
    // Live delivery continues with no gap.
    publish(&mut publisher, "chat:room", json!(56)).await;
    assert_eq!(recv_json(&mut back).await["offset"], 56);
    server.stop().await;
}

#[tokio::test]
async fn a_never_published_channel_is_at_offset_0_without_an_epoch_and_recovers_from_there() {
    let server = TestServer::start(with_namespaces).await;
    let (mut a, _) = v1_client(&server).await;
    let h = call(&mut a, json!({"type":"history","id":0,"channel":"small:n"})).await;
    assert_eq!((&h["offset"], &h["epoch"]), (&json!(0), &json!("")), "{h}");
    let sub = subscribe(&mut a, "small:n").await;
    assert_eq!(
        (&sub["offset"], &sub["epoch"]),
        (&json!(0), &json!("")),
        "{sub}"
    );
    let start = json!({"offset":0,"epoch":""});
    let (mut b, _) = v1_client(&server).await;
    for n in 1..=5 {
        publish(&mut b, "small:n", json!(n)).await;
    }
    let (mut c, _) = v1_client(&server).await;
    let sub = call(
        &mut c,
        json!({"type":"subscribe","id":1,"channel":"small:n","since":start}),
    )
    .await;
    assert_eq!(sub["recovered"], true, "{sub}");
    assert_eq!(offsets(&sub["publications"]), vec![1, 2, 3, 4, 5]);
    assert_ne!(sub["epoch"], "", "publishing started an epoch");
    let page = call(
        &mut c,
        json!({"type":"history","id":2,"channel":"small:n","since":start}),
    )
    .await;
    assert_eq!(page["complete"], true, "{page}");
    for n in 6..=12 {
        publish(&mut b, "small:n", json!(n)).await;
    }
    let (mut d, _) = v1_client(&server).await;
    let sub = call(
        &mut d,
        json!({"type":"subscribe","id":3,"channel":"small:n","since":start}),
    )
    .await;
    assert_eq!(
        sub["recovered"], false,
        "offsets 1 and 2 were trimmed: {sub}"
    );
    assert_eq!(sub["publications"], json!([]));
    server.stop().await;
}

#[tokio::test]
async fn recovery_fails_whole_when_history_no_longer_covers_it_or_the_epoch_changed() {
    let server = TestServer::start(with_namespaces).await;
    let (mut a, _) = v1_client(&server).await;
    let mut epoch = Value::Null;
    for n in 1..=20 {
        publish(&mut a, "small:x", json!(n)).await;
        if n == 1 {
            let h = call(
                &mut a,
                json!({"type":"history","id":0,"channel":"small:x","limit":0}),
            )
            .await;
            epoch = h["epoch"].clone();
        }
    }
    let (mut b, _) = v1_client(&server).await;
    let sub = call(
        &mut b,
        json!({"type":"subscribe","id":1,"channel":"small:x","since":{"offset":3,"epoch":epoch}}),
    )
    .await;
    assert_eq!(sub["recovered"], false, "offsets 4..10 were trimmed: {sub}");
    assert_eq!(sub["publications"], json!([]), "never a partial replay");
    assert_eq!(sub["offset"], 20);

    let (mut c, _) = v1_client(&server).await;
    let sub = call(
        &mut c,
        json!({"type":"subscribe","id":2,"channel":"small:x","since":{"offset":15,"epoch":"another-life"}}),
    )
    .await;
    assert_eq!(sub["recovered"], false);
    assert_eq!(sub["publications"], json!([]));

    let (mut d, _) = v1_client(&server).await;
    let sub = call(
        &mut d,
        json!({"type":"subscribe","id":3,"channel":"small:x","since":{"offset":20,"epoch":epoch}}),
    )
    .await;
    assert_eq!(sub["recovered"], true, "nothing missed is a full recovery");
    assert_eq!(sub["publications"], json!([]));
    server.stop().await;
}

/// Recoveries with publications arriving all along, before, during and after each `subscribe`.
/// A publication landing between the moment a recovering client starts buffering live pushes
/// and its history read is both replayed and buffered (and must be sent once); one landing
/// between the history read and the switch to live is only buffered (and must be sent). With
/// the in-memory broker that window is short, so no single recovery is sure to hit it; hence
/// three pipelining publishers, joins and presence to widen it (`join_leave`), and 200
/// recoveries, four at a time: a server that sends the overlap twice fails in the first few
/// dozen (see the cluster tests for the same over Redis and NATS, where the window is wide).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_while_publications_keep_arriving_loses_and_doubles_nothing() {
    const ATTEMPTS: u64 = 50;
    const CLIENTS: u64 = 4;
    let server = TestServer::start(|c| {
        with_namespaces(c);
        c.buffer = 1 << 16;
        c.history_bytes = 32 << 20;
        c.namespaces.insert(
            "busy",
            NamespaceOptions {
                history_size: 10_000,
                join_leave: true,
                ..NamespaceOptions::default()
            },
        );
    })
    .await;
    let mut publishers = Vec::new();
    for _ in 0..3 {
        publishers.push(v1_client(&server).await.0);
    }
    let publishing = Publishing::start(publishers, "busy:x", 16);
    publishing.reached(50).await;
    let (mut probe, _) = v1_client(&server).await;
    let epoch = call(
        &mut probe,
        json!({"type":"history","id":0,"channel":"busy:x","limit":0}),
    )
    .await["epoch"]
        .clone();
    for attempt in 0..ATTEMPTS {
        // Clients that last saw an offset 30 behind the head recover from it, side by side.
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            clients.push(v1_client(&server).await.0);
        }
        let recoveries = clients.iter_mut().zip(0..).map(|(ws, n)| {
            recover_while_publishing(
                ws,
                "busy:x",
                &publishing,
                &epoch,
                30,
                20,
                attempt * CLIENTS + n,
            )
        });
        futures_util::future::join_all(recoveries).await;
    }
    publishing.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn presence_and_join_leave_follow_connections_without_ghosts() {
    let server = TestServer::start(|c| {
        with_namespaces(c);
        c.ping_interval = std::time::Duration::from_secs(1);
        c.timeout = std::time::Duration::from_secs(2);
    })
    .await;
    let (mut a, a_id) = v1_client(&server).await;
    let (mut b, b_id) = v1_client(&server).await;
    subscribe(&mut a, "chat:p").await;
    subscribe(&mut b, "chat:p").await;
    let join = recv_json(&mut a).await;
    assert_eq!(
        join,
        json!({"type":"join","channel":"chat:p","client":{"client_id":b_id,"user":null}})
    );

    let ids = presence_of(&mut a, "chat:p").await;
    let mut expected = vec![a_id.clone(), b_id.clone()];
    expected.sort();
    assert_eq!(ids, expected);

    // Abrupt TCP loss: the entry goes and a leave is pushed.
    drop(b);
    let leave = recv_json(&mut a).await;
    assert_eq!(
        leave,
        json!({"type":"leave","channel":"chat:p","client":{"client_id":b_id,"user":null}})
    );
    let present = call(
        &mut a,
        json!({"type":"presence","id":"who2","channel":"chat:p"}),
    )
    .await;
    assert_eq!(present["clients"], json!([{"client_id":a_id,"user":null}]));

    // A half-open client (never answers pings) is removed once the heartbeat gives up.
    let mut silent = RawClient::connect(server.addr, "/ws").await;
    silent
        .send_text(r#"{"type":"subscribe","id":1,"channel":"chat:p"}"#)
        .await;
    let join = recv_json(&mut a).await;
    assert_eq!(join["type"], "join");
    let silent_id = join["client"]["client_id"].clone();
    // `a` keeps answering pings by reading; the silent one is closed with 4000.
    let leave = recv_json(&mut a).await;
    assert_eq!(leave["type"], "leave");
    assert_eq!(leave["client"]["client_id"], silent_id);
    assert_eq!(silent.close_code().await, 4000);
    let present = call(
        &mut a,
        json!({"type":"presence","id":"who3","channel":"chat:p"}),
    )
    .await;
    assert_eq!(present["clients"].as_array().unwrap().len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn bad_commands_get_error_replies_with_their_id_and_the_connection_stays_open() {
    let server = TestServer::start(|c| {
        with_namespaces(c);
        c.max_channels = 3;
        c.max_data_size = 64;
    })
    .await;
    let (mut a, _) = v1_client(&server).await;
    subscribe(&mut a, "one").await;
    subscribe(&mut a, "two").await;
    let cases = [
        (
            json!({"type":"subscribe","id":1,"channel":"nope:x"}),
            "unknown_namespace",
        ),
        (
            json!({"type":"subscribe","id":2,"channel":"bad name"}),
            "invalid_channel",
        ),
        (
            json!({"type":"subscribe","id":3,"channel":""}),
            "invalid_channel",
        ),
        (
            json!({"type":"subscribe","id":4,"channel":"one"}),
            "already_subscribed",
        ),
        (
            json!({"type":"unsubscribe","id":5,"channel":"three"}),
            "not_subscribed",
        ),
        (json!({"type":"subscribe","id":6}), "missing_field"),
        (
            json!({"type":"subscribe","id":7,"channel":["x"]}),
            "invalid_field",
        ),
        (
            json!({"type":"subscribe","id":8,"channel":"x","since":{"offset":-1,"epoch":"e"}}),
            "invalid_field",
        ),
        (
            json!({"type":"publish","id":9,"channel":"one"}),
            "missing_field",
        ),
        (
            json!({"type":"publish","id":10,"channel":"one","data":"x".repeat(100)}),
            "data_too_big",
        ),
        (
            json!({"type":"publish","id":11,"channel":"readonly:x","data":1}),
            "permission_denied",
        ),
        (
            json!({"type":"publish","id":12,"channel":"default","data":1}),
            "permission_denied",
        ),
        (
            json!({"type":"presence","id":13,"channel":"readonly:x"}),
            "presence_disabled",
        ),
        (
            json!({"type":"history","id":14,"channel":"one","limit":"ten"}),
            "invalid_field",
        ),
        (
            json!({"type":"history","id":"s","channel":"one","limit":100000}),
            "invalid_field",
        ),
    ];
    for (command, code) in cases {
        let reply = call(&mut a, command.clone()).await;
        assert_eq!(reply["type"], "error", "{command}: {reply}");
        assert_eq!(reply["code"], code, "{command}: {reply}");
        assert!(reply["message"].as_str().unwrap().len() > 5);
    }
    subscribe(&mut a, "three").await;
    let reply = call(&mut a, json!({"type":"subscribe","id":15,"channel":"four"})).await;
    assert_eq!(reply["code"], "too_many_channels");
    // An unknown lower-case type is a v1 mistake: a v1 error with its id.
    let reply = call(&mut a, json!({"type":"dance","id":16})).await;
    assert_eq!(
        reply,
        json!({"type":"error","id":16,"code":"unknown_type","message":"unknown message type \"dance\""})
    );
    // Anything else, even what a legacy connection gets a legacy `Error` for, is a v1 error
    // on a v1 connection.
    send_text(&mut a, r#"{"type":5,"id":17}"#).await;
    let reply = recv_json(&mut a).await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "invalid_field", "{reply}");
    // Still open and working.
    assert_eq!(publish(&mut a, "one", json!({"ok":true})).await, 1);
    server.stop().await;
}

#[tokio::test]
async fn legacy_and_v1_share_the_default_channel() {
    let server = TestServer::start(with_namespaces).await;
    let (mut legacy, _) = join(&server).await;
    let (mut modern, _) = join(&server).await;
    // A second legacy client that stays: once it has a chat message, the message is stored.
    let (mut witness, _) = join(&server).await;
    send_text(&mut legacy, r#"{"sender":"old","content":"hello"}"#).await;
    let chat = recv_json(&mut modern).await;
    assert_eq!(chat["type"], "Chat", "the default channel speaks legacy");
    assert_eq!(recv_json(&mut witness).await["content"], "hello");
    let history = call(
        &mut modern,
        json!({"type":"history","id":1,"channel":"default"}),
    )
    .await;
    assert_eq!(history["publications"][0]["data"]["content"], "hello");
    let present = call(
        &mut modern,
        json!({"type":"presence","id":2,"channel":"default"}),
    )
    .await;
    assert_eq!(
        present["code"], "presence_disabled",
        "the default channel holds everyone: no presence list"
    );
    // A v1 client may leave the default channel, after which legacy chat no longer reaches it.
    call(
        &mut modern,
        json!({"type":"unsubscribe","id":3,"channel":"default"}),
    )
    .await;
    send_text(&mut legacy, r#"{"sender":"old","content":"anyone?"}"#).await;
    // Published and stored before the history call below reads it.
    // (Legacy clients first hear of the v1 client leaving, as a `Disconnect`.)
    let mut heard = recv_json(&mut witness).await;
    while heard["type"] == "Disconnect" {
        heard = recv_json(&mut witness).await;
    }
    assert_eq!(heard["content"], "anyone?");
    let reply = call(
        &mut modern,
        json!({"type":"history","id":4,"channel":"default","limit":1}),
    )
    .await;
    assert_eq!(
        reply["type"], "history",
        "no Chat frame arrived before the reply"
    );
    assert_eq!(reply["publications"][0]["data"]["content"], "anyone?");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_reading_client_on_a_gap_namespace_gets_a_gap_and_catches_up() {
    const TOTAL: u64 = 4000;
    const WINDOW: u64 = 32;
    let server = TestServer::start(|c| {
        c.buffer = 64;
        c.history_bytes = 64 << 20;
        c.namespaces.insert(
            "live",
            NamespaceOptions {
                history_size: 10_000,
                slow_policy: SlowPolicy::Gap,
                ..NamespaceOptions::default()
            },
        );
    })
    .await;
    let (mut publisher, _) = v1_client(&server).await;
    let (mut fast, _) = v1_client(&server).await;
    subscribe(&mut fast, "live:feed").await;
    let mut slow = RawClient::connect(server.addr, "/ws").await;
    slow.send_text(r#"{"type":"unsubscribe","id":0,"channel":"default"}"#)
        .await;
    slow.send_text(r#"{"type":"subscribe","id":1,"channel":"live:feed"}"#)
        .await;
    // Wait until the slow client is really subscribed (it still reads, for now). Its
    // position is `{0, ""}` (nothing published yet); the publications bring the epoch.
    let mut epoch = loop {
        let (_, payload) = slow.read_frame().await.unwrap();
        let frame: Value = serde_json::from_slice(&payload).unwrap();
        if frame["type"] == "subscribed" {
            break frame["epoch"].clone();
        }
    };

    let (progress_tx, mut progress) = tokio::sync::mpsc::unbounded_channel();
    let reading = tokio::spawn(async move {
        for n in 1..=TOTAL {
            let push = recv_json(&mut fast).await;
            assert_eq!(
                push["offset"], n,
                "the fast client sees every message in order"
            );
            let _ = progress_tx.send(n);
        }
        fast
    });
    let filler = "y".repeat(2000);
    for n in 1..=TOTAL {
        send_text(
            &mut publisher,
            &json!({"type":"publish","channel":"live:feed","data":{"n":n,"pad":filler}})
                .to_string(),
        )
        .await;
        if n > WINDOW {
            while let Some(seen) = progress.recv().await {
                if seen + WINDOW >= n {
                    break;
                }
            }
        }
    }
    let _fast = reading.await.unwrap();

    // The slow client now reads: contiguous publications, then one gap, and it is still open.
    let mut last = 0;
    let gap = loop {
        let (opcode, payload) = slow.read_frame().await.expect("still connected");
        if opcode != 0x1 {
            continue;
        }
        let frame: Value = serde_json::from_slice(&payload).unwrap();
        match frame["type"].as_str().unwrap() {
            "publication" => {
                let offset = frame["offset"].as_u64().unwrap();
                assert_eq!(offset, last + 1, "no hole before the gap");
                last = offset;
                epoch = frame["epoch"].clone();
            }
            "gap" => break frame,
            other => panic!("unexpected {other}: {frame}"),
        }
    };
    assert_eq!(gap["channel"], "live:feed");
    assert_eq!(
        gap["offset"], last,
        "the gap names the last offset the client got"
    );
    assert!(last < TOTAL, "the client really fell behind");
    // Catch up with history, without reconnecting.
    slow.send_text(&json!({"type":"history","id":"catch-up","channel":"live:feed","since":{"offset":last,"epoch":epoch},"limit":1000}).to_string())
        .await;
    let history = loop {
        let (_, payload) = slow.read_frame().await.expect("still connected");
        let frame: Value = serde_json::from_slice(&payload).unwrap();
        if frame["type"] == "history" {
            break frame;
        }
    };
    assert_eq!(
        history["complete"], true,
        "nothing between the gap and the page was lost"
    );
    let got = offsets(&history["publications"]);
    assert_eq!(got.first().copied(), Some(last + 1));
    assert_eq!(
        got,
        (last + 1..last + 1 + got.len() as u64).collect::<Vec<_>>()
    );
    let stats = server.stats().await;
    assert_eq!(stats["slow_consumer_closes_total"], 0, "{stats}");
    assert_eq!(stats["connections"], 3);
    server.stop().await;
}

#[tokio::test]
async fn resubscribing_never_delivers_a_publication_twice() {
    let server = TestServer::start(with_namespaces).await;
    let (mut a, _) = v1_client(&server).await;
    let sub = subscribe(&mut a, "chat:again").await;
    let epoch = sub["epoch"].clone();
    // Pipelined: publications queued for the old subscription must go out before the new
    // subscription's replay, never after it.
    for n in 1..=5 {
        send_text(
            &mut a,
            &json!({"type":"publish","channel":"chat:again","data":n}).to_string(),
        )
        .await;
    }
    send_text(
        &mut a,
        &json!({"type":"unsubscribe","id":"u","channel":"chat:again"}).to_string(),
    )
    .await;
    send_text(
        &mut a,
        &json!({"type":"subscribe","id":"s","channel":"chat:again","since":{"offset":0,"epoch":epoch}})
            .to_string(),
    )
    .await;
    let resub = loop {
        let frame = recv_json(&mut a).await;
        if frame["type"] == "subscribed" {
            break frame;
        }
    };
    assert_eq!(resub["recovered"], true);
    assert_eq!(offsets(&resub["publications"]), vec![1, 2, 3, 4, 5]);
    // Nothing of `chat:again` may follow the replay: the next frame answers the next command.
    let marker = call(
        &mut a,
        json!({"type":"presence","id":"after","channel":"chat:again"}),
    )
    .await;
    assert_eq!(
        marker["type"], "presence",
        "no duplicate publication after the replay"
    );
    server.stop().await;
}

/// `messages_in` (minus `before`) once it has stayed the same for half a second; fails as
/// soon as it reaches `limit`, or if it never settles within [`WAIT`].
async fn settled_messages_in(server: &TestServer, before: u64, limit: u64) -> u64 {
    let settle = std::time::Duration::from_millis(500);
    let deadline = std::time::Instant::now() + WAIT;
    let mut last = None;
    let mut since = std::time::Instant::now();
    loop {
        let handled = server.stats().await["messages_in"].as_u64().unwrap() - before;
        assert!(
            handled < limit,
            "the server kept answering into its own memory: {handled} handled"
        );
        if last != Some(handled) {
            last = Some(handled);
            since = std::time::Instant::now();
        } else if since.elapsed() >= settle {
            return handled;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server never stopped handling commands: {handled} so far"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_client_that_pipelines_big_replies_without_reading_is_paused_not_buffered() {
    let server = TestServer::start(|c| {
        with_namespaces(c);
        c.history_bytes = 64 << 20;
    })
    .await;
    let (mut a, _) = v1_client(&server).await;
    let big = "x".repeat(10_000);
    for _ in 0..100 {
        publish(&mut a, "chat:big", json!(big)).await;
    }
    let before = server.stats().await["messages_in"].as_u64().unwrap();
    // 300 history commands of about 1 MB each, and no reading. Each command is padded to about
    // 60 KB, so the server completes at most one per read and counts each as it handles it
    // (the client sends from a task of its own: once the server stops reading, sending blocks).
    let ws = connect(&server, "/ws").await;
    let (mut sink, mut stream) = futures_util::StreamExt::split(ws);
    let command = json!({"type":"history","channel":"chat:big","pad":"p".repeat(60_000)});
    let sending = tokio::spawn(async move {
        for _ in 0..300 {
            let message = tokio_tungstenite::tungstenite::Message::text(command.to_string());
            futures_util::SinkExt::send(&mut sink, message)
                .await
                .unwrap();
        }
        sink
    });
    // The server must stop handling them while the client does not read: the count settles
    // (stays the same for half a second) below 30. A server that goes on answering into its
    // own memory moves it with each command, however slowly (up to one per half second), and
    // fails here.
    let handled = settled_messages_in(&server, before, 30).await;
    assert!(handled >= 1, "the server answered nothing at all");
    // Once the client reads, every command is answered.
    let mut replies = 0;
    while replies < 300 {
        let message = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut stream))
            .await
            .expect("no message within the wait")
            .expect("still connected")
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message
            && text.starts_with(r#"{"type":"history""#)
        {
            replies += 1;
        }
    }
    let _sink = sending.await.unwrap();
    server.stop().await;
}
