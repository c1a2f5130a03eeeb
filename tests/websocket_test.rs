//! The `/ws` endpoint over real sockets: the legacy dialect, errors, limits and close codes.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

const WSCAT_EXAMPLE: &str = r#"{"id":"00000000-0000-0000-0000-000000000000","sender":"test_user","content":"Hello from wscat!","timestamp":"2025-03-15T12:00:00Z"}"#;

#[tokio::test]
async fn welcome_carries_a_fresh_uuid_v4() {
    let server = TestServer::start(|_| {}).await;
    let (_a, a_id) = join(&server).await;
    let (_b, b_id) = join(&server).await;
    let a = Uuid::parse_str(&a_id).unwrap();
    assert_eq!(a.get_version_num(), 4);
    assert_eq!(a_id, a.hyphenated().to_string());
    assert_ne!(a_id, b_id);
    server.stop().await;
}

#[tokio::test]
async fn wscat_example_reaches_others_exactly_and_not_the_sender() {
    let server = TestServer::start(|_| {}).await;
    let (mut a, _) = join(&server).await;
    let (mut b, _) = join(&server).await;
    let (mut c, _) = join(&server).await;
    send_text(&mut a, WSCAT_EXAMPLE).await;
    for ws in [&mut b, &mut c] {
        let got = recv_json(ws).await;
        assert_eq!(
            got,
            serde_json::json!({"type":"Chat","id":"00000000-0000-0000-0000-000000000000","sender":"test_user","content":"Hello from wscat!","timestamp":"2025-03-15T12:00:00Z"})
        );
    }
    // The sender got no copy: the next thing it receives is the answer to its next message.
    send_text(&mut a, "not json").await;
    assert_eq!(recv_json(&mut a).await["code"], "invalid_json");
    server.stop().await;
}

#[tokio::test]
async fn javascript_example_without_id_gets_one_assigned() {
    let server = TestServer::start(|_| {}).await;
    let (mut a, _) = join(&server).await;
    let (mut b, _) = join(&server).await;
    // Exactly what the README's JavaScript client sends.
    send_text(
        &mut a,
        r#"{"sender":"client","content":"Hello from JS client","timestamp":"2025-03-15T12:00:00.123Z"}"#,
    )
    .await;
    let got = recv_json(&mut b).await;
    assert_eq!(got["type"], "Chat");
    assert_eq!(got["sender"], "client");
    assert_eq!(got["content"], "Hello from JS client");
    assert_eq!(got["timestamp"], "2025-03-15T12:00:00.123Z");
    let id = Uuid::parse_str(got["id"].as_str().unwrap()).unwrap();
    assert_eq!(id.get_version_num(), 4);

    // No timestamp at all: the server's clock, RFC 3339 in UTC.
    let before = time::OffsetDateTime::now_utc() - time::Duration::seconds(1);
    send_text(&mut a, r#"{"sender":"client","content":"no time"}"#).await;
    let got = recv_json(&mut b).await;
    let stamp = got["timestamp"].as_str().unwrap();
    assert!(stamp.ends_with('Z'), "{stamp}");
    let parsed =
        time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339).unwrap();
    assert!(
        parsed >= before && parsed <= time::OffsetDateTime::now_utc() + time::Duration::seconds(1)
    );
    server.stop().await;
}

#[tokio::test]
async fn newcomers_get_the_last_ten_messages_oldest_first() {
    let server = TestServer::start(|_| {}).await;
    let (mut a, _) = join(&server).await;
    for n in 0..12 {
        send_text(&mut a, &format!(r#"{{"sender":"a","content":"m{n}"}}"#)).await;
    }
    // An error round trip proves all 12 were processed (messages are handled in order).
    send_text(&mut a, "[]").await;
    assert_eq!(recv_json(&mut a).await["code"], "invalid_message");

    let (mut late, _) = join(&server).await;
    for n in 2..12 {
        let got = recv_json(&mut late).await;
        assert_eq!(got["type"], "Chat");
        assert_eq!(got["content"], format!("m{n}"));
    }
    // Then live traffic follows, with nothing replayed twice.
    send_text(&mut a, r#"{"sender":"a","content":"live"}"#).await;
    assert_eq!(recv_json(&mut late).await["content"], "live");
    server.stop().await;
}

#[tokio::test]
async fn leaving_is_announced_to_the_others() {
    let server = TestServer::start(|_| {}).await;
    let (mut a, a_id) = join(&server).await;
    let (mut b, _) = join(&server).await;
    a.close(None).await.unwrap();
    let got = recv_json(&mut b).await;
    assert_eq!(
        got,
        serde_json::json!({"type":"Disconnect","client_id":a_id})
    );

    // An abrupt TCP drop is announced too.
    let (c, c_id) = join(&server).await;
    drop(c);
    let got = recv_json(&mut b).await;
    assert_eq!(
        got,
        serde_json::json!({"type":"Disconnect","client_id":c_id})
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_input_gets_an_error_frame_and_the_connection_stays_open() {
    let server = TestServer::start(|_| {}).await;
    let (mut a, _) = join(&server).await;
    let (mut b, _) = join(&server).await;
    let cases = [
        ("{\"sender\": ", "invalid_json"),
        ("\"just a string\"", "invalid_message"),
        ("[1,2,3]", "invalid_message"),
        (r#"{"content":"no sender"}"#, "missing_field"),
        (r#"{"sender":"a"}"#, "missing_field"),
        (r#"{"sender":42,"content":"x"}"#, "invalid_field"),
        (
            r#"{"sender":"a","content":{"nested":true}}"#,
            "invalid_field",
        ),
        (
            r#"{"sender":"a","content":"x","id":"not-a-uuid"}"#,
            "invalid_field",
        ),
        (
            r#"{"sender":"a","content":"x","timestamp":12}"#,
            "invalid_field",
        ),
        (
            r#"{"sender":"a","content":"x","type":"Shout"}"#,
            "unknown_type",
        ),
    ];
    for (input, code) in cases {
        send_text(&mut a, input).await;
        let err = recv_json(&mut a).await;
        assert_eq!(err["type"], "Error", "{input}");
        assert_eq!(err["code"], code, "{input}");
        let message = err["message"].as_str().unwrap();
        assert!(
            message.len() > 10,
            "a human sentence for {input}: {message}"
        );
    }
    a.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    let err = recv_json(&mut a).await;
    assert_eq!(err["code"], "binary_not_supported");

    // Still open, and nothing bad was broadcast.
    send_text(
        &mut a,
        r#"{"sender":"a","content":"still here","type":"Chat","extra":[1]}"#,
    )
    .await;
    assert_eq!(recv_json(&mut b).await["content"], "still here");
    server.stop().await;
}

#[tokio::test]
async fn oversized_message_closes_with_1009_and_is_not_stored() {
    let server = TestServer::start(|c| c.max_message_size = 1024).await;
    let (mut a, _) = join(&server).await;
    let big = format!(r#"{{"sender":"a","content":"{}"}}"#, "x".repeat(2000));
    send_text(&mut a, &big).await;
    assert_eq!(recv_close_code(&mut a).await, 1009);

    let (mut late, _) = join(&server).await;
    send_text(&mut late, "[]").await;
    let next = recv_json(&mut late).await;
    assert_eq!(
        next["code"], "invalid_message",
        "nothing was replayed: {next}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_ten_megabyte_message_is_refused_from_its_header() {
    let server = TestServer::start(|_| {}).await;
    let mut raw = RawClient::connect(server.addr, "/ws").await;
    let _welcome = raw.read_frame().await;
    raw.send_frame(0x81, &vec![b'a'; 10 * 1024 * 1024], true)
        .await;
    assert_eq!(raw.close_code().await, 1009);
    server.stop().await;
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    let server = TestServer::start(|_| {}).await;
    let mut raw = RawClient::connect(server.addr, "/ws").await;
    raw.send_frame(0x81, &[b'{', 0xff, 0xfe, b'}'], true).await;
    assert_eq!(raw.close_code().await, 1007);
    server.stop().await;
}

#[tokio::test]
async fn protocol_violations_close_with_1002() {
    let server = TestServer::start(|_| {}).await;
    // Unmasked client frame.
    let mut raw = RawClient::connect(server.addr, "/ws").await;
    raw.send_frame(0x81, b"{}", false).await;
    assert_eq!(raw.close_code().await, 1002);
    // Reserved opcode.
    let mut raw = RawClient::connect(server.addr, "/ws").await;
    raw.send_frame(0x83, b"", true).await;
    assert_eq!(raw.close_code().await, 1002);
    // Continuation with nothing to continue.
    let mut raw = RawClient::connect(server.addr, "/ws").await;
    raw.send_frame(0x80, b"x", true).await;
    assert_eq!(raw.close_code().await, 1002);
    server.stop().await;
}

#[tokio::test]
async fn fragmented_messages_and_pings_are_handled() {
    let server = TestServer::start(|_| {}).await;
    let (mut b, _) = join(&server).await;
    let mut raw = RawClient::connect(server.addr, "/ws").await;
    let msg = br#"{"sender":"raw","content":"in pieces"}"#;
    raw.send_frame(0x01, &msg[..10], true).await;
    raw.send_frame(0x89, b"are you there", true).await;
    raw.send_frame(0x80, &msg[10..], true).await;
    // Welcome, then the pong with the ping's payload.
    assert_eq!(raw.read_frame().await.unwrap().0, 0x1);
    assert_eq!(
        raw.read_frame().await.unwrap(),
        (0xA, b"are you there".to_vec())
    );
    assert_eq!(recv_json(&mut b).await["content"], "in pieces");
    server.stop().await;
}

#[tokio::test]
async fn client_close_is_echoed_with_its_code() {
    let server = TestServer::start(|_| {}).await;
    let mut raw = RawClient::connect(server.addr, "/ws").await;
    raw.send_frame(0x88, &[0x0F, 0xA0, b'b', b'y', b'e'], true)
        .await; // 4000
    assert_eq!(raw.close_code().await, 4000);
    assert!(
        raw.read_frame().await.is_none(),
        "server ends TCP after the close handshake"
    );
    server.stop().await;
}

#[tokio::test]
async fn echo_to_sender_option_returns_the_message() {
    let server = TestServer::start(|c| c.echo_to_sender = true).await;
    let (mut a, _) = join(&server).await;
    send_text(&mut a, WSCAT_EXAMPLE).await;
    assert_eq!(recv_json(&mut a).await["content"], "Hello from wscat!");
    server.stop().await;
}

#[tokio::test]
async fn server_pings_and_live_clients_survive_the_timeout() {
    let server = TestServer::start(|c| {
        c.ping_interval = std::time::Duration::from_secs(1);
        c.timeout = std::time::Duration::from_secs(2);
    })
    .await;
    let mut raw = RawClient::connect(server.addr, "/ws").await;
    assert_eq!(raw.read_frame().await.unwrap().0, 0x1, "welcome");
    // Answer pings for at least 4 s (twice the timeout) and at least 4 pings (each must come
    // within the wait): the connection must stay open all along.
    let started = std::time::Instant::now();
    let mut pings = 0;
    while pings < 4 || started.elapsed() < std::time::Duration::from_secs(4) {
        let (opcode, payload) = raw.read_frame().await.expect("still open");
        assert_eq!(opcode, 0x9, "only pings arrive on an idle connection");
        pings += 1;
        raw.send_frame(0x8A, &payload, true).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn silent_clients_are_closed_with_4000() {
    let server = TestServer::start(|c| {
        c.ping_interval = std::time::Duration::from_secs(1);
        c.timeout = std::time::Duration::from_secs(2);
    })
    .await;
    let (mut b, _) = join(&server).await;
    // `b` keeps reading (and so answers pings) while `raw` stays silent.
    let watcher = tokio::spawn(async move { recv_json(&mut b).await });
    let mut raw = RawClient::connect(server.addr, "/ws").await;
    let started = std::time::Instant::now();
    assert_eq!(raw.close_code().await, 4000);
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(1900),
        "closed too early: {waited:?}"
    );
    // Its departure is announced like any other.
    assert_eq!(watcher.await.unwrap()["type"], "Disconnect");
    server.stop().await;
}

#[tokio::test]
async fn a_trickle_of_bytes_is_not_proof_of_life() {
    let server = TestServer::start(|c| {
        c.ping_interval = std::time::Duration::from_secs(1);
        c.timeout = std::time::Duration::from_secs(2);
    })
    .await;
    let mut raw = RawClient::connect(server.addr, "/ws").await;
    let frame_start = [0x81u8, 0xFE, 0x10, 0x00, 1, 2, 3, 4];
    let started = std::time::Instant::now();
    let trickle = async {
        for byte in frame_start.iter().chain(std::iter::repeat(&b'a')) {
            if tokio::io::AsyncWriteExt::write_all(&mut raw.stream, &[*byte])
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            if started.elapsed() > std::time::Duration::from_secs(4) {
                break;
            }
        }
    };
    trickle.await;
    assert_eq!(
        raw.close_code().await,
        4000,
        "a never-finished frame keeps nobody alive"
    );
    server.stop().await;
}
