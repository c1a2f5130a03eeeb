//! Epochs end to end over real sockets and a real server process: a channel that never had a
//! publication is at `{offset: 0, epoch: ""}`, live publications carry the epoch their first
//! one started, and after a crash (the in-memory broker starts every channel again under a
//! new epoch) no position of the old life recovers anything of the new one silently.
#![allow(clippy::unwrap_used)]

mod common;

use common::process::Logged;
use common::*;
use serde_json::{Value, json};

/// Starts the server binary (in-memory broker) on `port` (0: any free one).
fn server(port: u16) -> (Logged, String) {
    let port = port.to_string();
    let mut logged = Logged::start(&[("RUSTY_SOCKS_PORT", port.as_str())]);
    let addr = logged.address();
    (logged, format!("ws://{addr}/ws"))
}

/// The next `publication` push on `ws` (skipping nothing else: none is expected).
async fn publication(ws: &mut Ws) -> Value {
    let frame = recv_json(ws).await;
    assert_eq!(frame["type"], "publication", "{frame}");
    frame
}

async fn subscribe_since(ws: &mut Ws, channel: &str, since: Value) -> Value {
    let reply = call(
        ws,
        json!({"type":"subscribe","id":"s","channel":channel,"since":since}),
    )
    .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    reply
}

#[tokio::test]
async fn subscribed_before_the_first_publication_then_a_crash_loses_nothing_silently() {
    let (mut first, url) = server(0);
    let port = url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .parse::<std::net::SocketAddr>()
        .unwrap()
        .port();

    // Reads of a channel nobody published on: the start position, every time.
    let (mut reader, _) = v1_client_url(&url).await;
    for id in 0..3 {
        let page = call(
            &mut reader,
            json!({"type":"history","id":id,"channel":"room"}),
        )
        .await;
        assert_eq!((&page["offset"], &page["epoch"]), (&json!(0), &json!("")));
    }
    let (mut early, _) = v1_client_url(&url).await;
    let sub = subscribe(&mut early, "room").await;
    assert_eq!((&sub["offset"], &sub["epoch"]), (&json!(0), &json!("")));

    // The first publications start an epoch, and every live one carries it.
    let (mut writer, _) = v1_client_url(&url).await;
    for n in 1..=3 {
        publish(&mut writer, "room", json!(n)).await;
    }
    let mut epoch = String::new();
    for n in 1..=3u64 {
        let p = publication(&mut early).await;
        assert_eq!(p["offset"], n, "{p}");
        let e = p["epoch"].as_str().unwrap();
        assert!(!e.is_empty(), "a live publication without its epoch: {p}");
        if n > 1 {
            assert_eq!(e, epoch, "one epoch for the stream");
        }
        epoch = e.to_owned();
    }
    // From the start position, everything is recovered while offset 1 is in history.
    let replay = subscribe_since(&mut reader, "room", json!({"offset":0,"epoch":""})).await;
    assert_eq!(replay["recovered"], true, "{replay}");
    assert_eq!(offsets(&replay["publications"]), vec![1, 2, 3]);
    assert_eq!(replay["epoch"], epoch.as_str());

    // The server crashes and comes back on the same port with nothing in memory.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let (_second, url) = server(port);

    // `early` comes back with what it holds, {3, E}: the channel is unknown to the new
    // server, and that is a failed recovery, not a success.
    let (mut early, _) = v1_client_url(&url).await;
    let back = subscribe_since(&mut early, "room", json!({"offset":3,"epoch":epoch})).await;
    assert_eq!(back["recovered"], false, "{back}");
    assert_eq!((&back["offset"], &back["epoch"]), (&json!(0), &json!("")));

    // The new life's publications reach it with their new epoch, from offset 1: none taken
    // for one it already had.
    let (mut writer, _) = v1_client_url(&url).await;
    for n in 1..=5 {
        publish(&mut writer, "room", json!(format!("new {n}"))).await;
    }
    let mut new_epoch = String::new();
    for n in 1..=5u64 {
        let p = publication(&mut early).await;
        assert_eq!(
            (&p["offset"], &p["data"]),
            (&json!(n), &json!(format!("new {n}")))
        );
        new_epoch = p["epoch"].as_str().unwrap().to_owned();
    }
    assert!(!new_epoch.is_empty());
    assert_ne!(new_epoch, epoch, "a restart starts a new epoch");

    // Positions of the old life never recover the new one.
    let (mut late, _) = v1_client_url(&url).await;
    let old = subscribe_since(&mut late, "room", json!({"offset":3,"epoch":epoch})).await;
    assert_eq!(old["recovered"], false, "{old}");
    assert_eq!(old["publications"], json!([]));
    assert_eq!(
        (&old["offset"], &old["epoch"]),
        (&json!(5), &json!(new_epoch))
    );
    // A client that kept the empty epoch while it got offsets 1 to 3 (as clients did before
    // publications carried their epoch): its offsets are read in no epoch, so the new
    // epoch's 1 to 3 are not skipped as delivered.
    let (mut kept, _) = v1_client_url(&url).await;
    let stale = subscribe_since(&mut kept, "room", json!({"offset":3,"epoch":""})).await;
    assert_eq!(stale["recovered"], false, "{stale}");
    assert_eq!(stale["publications"], json!([]));
    let page = call(
        &mut kept,
        json!({"type":"history","id":"h","channel":"room","since":{"offset":3,"epoch":""}}),
    )
    .await;
    assert_eq!(page["complete"], false, "{page}");
    // The start position still means "before anything": all of the new life.
    let (mut fresh, _) = v1_client_url(&url).await;
    let all = subscribe_since(&mut fresh, "room", json!({"offset":0,"epoch":""})).await;
    assert_eq!(all["recovered"], true, "{all}");
    assert_eq!(offsets(&all["publications"]), vec![1, 2, 3, 4, 5]);
}
