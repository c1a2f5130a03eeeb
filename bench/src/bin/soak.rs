//! Soak test for Rusty Socks: thousands of connections joining, publishing and leaving for
//! minutes (some dropped abruptly, without a close frame), a mass disconnect wave, and steady
//! subscribers that must lose nothing. Then checks that the server is back where it started.
//!
//! Loopback only, bounded in time and count. Run with `--help`; `bench/soak.sh` runs it against
//! a fresh server.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rusty_bench::{
    Args, each_frame, encode_frame, parse_url, process_cpu, process_rss_kib, ws_connect,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};

const HELP: &str =
    "soak - churn, mass disconnects and steady subscribers against one server (loopback only)

USAGE:
  soak --url ws://127.0.0.1:3030/ws --server-pid PID --api-key KEY [--duration 60]
       [--stayers 100] [--churners 100] [--rooms 20] [--rate 100] [--wave 2000]
       [--abrupt-percent 25]

  --stayers connections subscribe to soak:main for the whole run and check that its offsets
  are continuous, up to the last publish acknowledged. A publisher sends --rate messages/s
  there. --churners tasks each loop: connect, either chat on the legacy channel or subscribe
  to one of --rooms presence channels (soak:room-N) and publish once, stay 50-2000 ms, then
  leave: cleanly, or (--abrupt-percent of the time) by dropping TCP without a close frame
  (half of those with a reset). Halfway, --wave legacy clients connect, then all close at
  once: none may be closed as a slow consumer (4001). At the end every connection closes and
  the server must be back to 0 connections and tasks, with every room's presence empty.
  The server needs RUSTY_SOCKS_NAMESPACES with a `soak` namespace, RUSTY_SOCKS_API_KEY=KEY
  and RUSTY_SOCKS_MAX_CONN above stayers + churners + wave.

Prints RESULT key=value ... and exits 1 if a check failed.";

fn main() {
    let mut argv = std::env::args().skip(1).peekable();
    if matches!(
        argv.peek().map(String::as_str),
        None | Some("-h" | "--help" | "help")
    ) {
        println!("{HELP}");
        return;
    }
    let args = match Args::parse(argv) {
        Ok(args) => args,
        Err(err) => fail(&err),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&e.to_string()));
    let ok = runtime
        .block_on(soak(&args))
        .unwrap_or_else(|err| fail(&err));
    runtime.shutdown_timeout(Duration::from_millis(100));
    if !ok {
        std::process::exit(1);
    }
}

fn fail(message: &str) -> ! {
    eprintln!("soak: {message}");
    std::process::exit(2);
}

/// What every task adds to.
#[derive(Default)]
struct Counters {
    connects: AtomicU64,
    connect_failures: AtomicU64,
    clean_closes: AtomicU64,
    abrupt_drops: AtomicU64,
    churn_4001: AtomicU64,
    published: AtomicU64,
    publish_errors: AtomicU64,
    /// Highest offset acknowledged on soak:main.
    last_acked: AtomicU64,
    wave_4001: AtomicU64,
    wave_other: AtomicU64,
    wave_connect_failures: AtomicU64,
    /// Set while the wave runs: churners pause, so the wave measures the mass disconnect
    /// alone (and the generator's one thread keeps up with 19,000 sockets).
    pause: AtomicBool,
}

/// One client connection: raw frames, replies to pings.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    /// Whether text frames are parsed (wave clients only count them: 19,000 clients parsing
    /// every notice would make the generator, not the server, the bottleneck).
    parse: bool,
}

/// What [`Conn::read`] saw.
enum Event {
    Text(Value),
    Closed(Option<u16>),
}

impl Conn {
    async fn open(addr: std::net::SocketAddr, path: &str) -> std::io::Result<Self> {
        let (stream, buf) = tokio::time::timeout(Duration::from_secs(10), ws_connect(addr, path))
            .await
            .map_err(|_| std::io::Error::other("connect timed out"))??;
        Ok(Self {
            stream,
            buf,
            parse: true,
        })
    }

    async fn send(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(payload.len() + 8);
        encode_frame(&mut out, opcode, payload);
        self.stream.write_all(&out).await
    }

    async fn text(&mut self, json: &Value) -> std::io::Result<()> {
        self.send(1, json.to_string().as_bytes()).await
    }

    /// Reads until at least one event or `until`; answers pings on the way.
    async fn read(&mut self, until: Instant) -> std::io::Result<Vec<Event>> {
        loop {
            let mut events = Vec::new();
            let mut pongs = Vec::new();
            let parse = self.parse;
            each_frame(&mut self.buf, |opcode, payload| match opcode {
                1 if parse => events.push(Event::Text(
                    serde_json::from_slice(payload).unwrap_or(Value::Null),
                )),
                8 => events.push(Event::Closed(
                    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])),
                )),
                9 => pongs.push(payload.to_vec()),
                _ => {}
            });
            for payload in pongs {
                self.send(10, &payload).await?;
            }
            if !events.is_empty() {
                return Ok(events);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(events);
            }
            match tokio::time::timeout(left, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) => return Ok(vec![Event::Closed(None)]),
                Ok(Ok(_)) => {}
                Ok(Err(err)) => return Err(err),
                Err(_) => return Ok(Vec::new()),
            }
        }
    }

    /// Sends a close frame and waits (up to 30 s) for the server's; returns its code.
    async fn close(mut self) -> Option<u16> {
        if self.send(8, &1000u16.to_be_bytes()).await.is_err() {
            return None;
        }
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            match self.read(until).await {
                Ok(events) => {
                    for event in events {
                        if let Event::Closed(code) = event {
                            return code;
                        }
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }
}

/// A small xorshift generator: the soak needs variety, not quality.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// What one steady subscriber saw.
#[derive(Debug, Default)]
struct Stayer {
    received: u64,
    lost: u64,
    duplicates: u64,
    last: u64,
    closed_by_server: Option<u16>,
}

async fn stayer(addr: std::net::SocketAddr, mut stop: watch::Receiver<bool>) -> Stayer {
    let mut seen = Stayer::default();
    let Ok(mut conn) = Conn::open(addr, "/ws").await else {
        seen.closed_by_server = Some(0);
        return seen;
    };
    let subscribe = serde_json::json!({"type":"subscribe","id":"s","channel":"soak:main"});
    if conn.text(&subscribe).await.is_err() {
        seen.closed_by_server = Some(0);
        return seen;
    }
    let mut subscribed = false;
    loop {
        if *stop.borrow() {
            break;
        }
        let until = Instant::now() + Duration::from_millis(200);
        let events = tokio::select! {
            events = conn.read(until) => events,
            _ = stop.changed() => break,
        };
        let Ok(events) = events else {
            seen.closed_by_server = Some(0);
            return seen;
        };
        for event in events {
            match event {
                Event::Closed(code) => {
                    seen.closed_by_server = Some(code.unwrap_or(0));
                    return seen;
                }
                Event::Text(frame) => match frame["type"].as_str() {
                    Some("subscribed") if frame["id"] == "s" => {
                        seen.last = frame["offset"].as_u64().unwrap_or(0);
                        subscribed = true;
                    }
                    Some("publication") if subscribed && frame["channel"] == "soak:main" => {
                        let offset = frame["offset"].as_u64().unwrap_or(0);
                        seen.received += 1;
                        if offset <= seen.last {
                            seen.duplicates += 1;
                        } else {
                            seen.lost += offset - seen.last - 1;
                            seen.last = offset;
                        }
                    }
                    _ => {}
                },
            }
        }
    }
    if conn.close().await.is_none() {
        seen.closed_by_server = Some(0);
    }
    seen
}

/// Publishes to soak:main at `rate` per second until `stop`.
async fn publisher(
    addr: std::net::SocketAddr,
    rate: u64,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let mut conn = Conn::open(addr, "/ws").await.map_err(|e| e.to_string())?;
    let every = Duration::from_micros(1_000_000 / rate.max(1));
    let mut next = Instant::now();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let data =
            serde_json::json!({"type":"publish","id":sent,"channel":"soak:main","data":sent});
        conn.text(&data).await.map_err(|e| e.to_string())?;
        sent += 1;
        next += every;
        // Read replies until the next publish is due.
        loop {
            let events = conn.read(next).await.map_err(|e| e.to_string())?;
            if events.is_empty() {
                break;
            }
            for event in events {
                match event {
                    Event::Closed(code) => return Err(format!("publisher closed: {code:?}")),
                    Event::Text(frame) => count_publish_reply(&frame, &counters),
                }
            }
        }
    }
    // The last replies.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let events = conn.read(until).await.map_err(|e| e.to_string())?;
        for event in events {
            if let Event::Text(frame) = event {
                count_publish_reply(&frame, &counters);
            }
        }
    }
    conn.close().await;
    Ok(())
}

fn count_publish_reply(frame: &Value, counters: &Counters) {
    match frame["type"].as_str() {
        Some("published") => {
            counters.published.fetch_add(1, Ordering::Relaxed);
            if frame["channel"] == "soak:main" {
                let offset = frame["offset"].as_u64().unwrap_or(0);
                counters.last_acked.fetch_max(offset, Ordering::Relaxed);
            }
        }
        Some("error") => {
            counters.publish_errors.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// One churning client slot: connect, do a little, leave, again, until `stop`.
async fn churner(
    addr: std::net::SocketAddr,
    seed: u64,
    rooms: u64,
    abrupt_percent: u64,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = Rng::new(seed);
    while !stop.load(Ordering::Relaxed) {
        if counters.pause.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let Ok(mut conn) = Conn::open(addr, "/ws").await else {
            counters.connect_failures.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        counters.connects.fetch_add(1, Ordering::Relaxed);
        let sent = if rng.below(2) == 0 {
            let chat = serde_json::json!({"type":"Chat","sender":"churn","content":"hello"});
            conn.text(&chat).await
        } else {
            let room = format!("soak:room-{}", rng.below(rooms));
            let subscribe = serde_json::json!({"type":"subscribe","id":"s","channel":room});
            let publish =
                serde_json::json!({"type":"publish","id":"p","channel":"soak:main","data":"churn"});
            match conn.text(&subscribe).await {
                Ok(()) => conn.text(&publish).await,
                Err(err) => Err(err),
            }
        };
        if sent.is_err() {
            continue;
        }
        let until = Instant::now() + Duration::from_millis(50 + rng.below(1950));
        let mut closed = false;
        while Instant::now() < until && !closed {
            match conn.read(until).await {
                Ok(events) => {
                    for event in events {
                        match event {
                            Event::Closed(code) => {
                                if code == Some(4001) {
                                    counters.churn_4001.fetch_add(1, Ordering::Relaxed);
                                }
                                closed = true;
                            }
                            Event::Text(frame) => count_publish_reply(&frame, &counters),
                        }
                    }
                }
                Err(_) => closed = true,
            }
        }
        if closed {
            continue;
        }
        if rng.below(100) < abrupt_percent {
            counters.abrupt_drops.fetch_add(1, Ordering::Relaxed);
            if rng.below(2) == 0 {
                // A reset instead of a FIN.
                let _ = conn.stream.set_zero_linger();
            }
            drop(conn);
        } else {
            conn.close().await;
            counters.clean_closes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `size` legacy clients connect, then all close at once. Returns the milliseconds from the
/// close frames going out to the last close reply.
async fn wave(
    addr: std::net::SocketAddr,
    size: usize,
    counters: Arc<Counters>,
) -> Result<u64, String> {
    let limit = Arc::new(Semaphore::new(200));
    let (go, _) = watch::channel(false);
    let go = Arc::new(go);
    let connected = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(size);
    for _ in 0..size {
        let (limit, go, connected, counters) = (
            Arc::clone(&limit),
            Arc::clone(&go),
            Arc::clone(&connected),
            Arc::clone(&counters),
        );
        tasks.push(tokio::spawn(async move {
            let permit = limit.acquire_owned().await;
            let opened = Conn::open(addr, "/ws").await;
            drop(permit);
            connected.fetch_add(1, Ordering::Relaxed);
            let Ok(mut conn) = opened else {
                counters.wave_connect_failures.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            conn.parse = false;
            let mut go = go.subscribe();
            // Read (the welcome, chat, notices) until told to close.
            loop {
                if *go.borrow() {
                    break;
                }
                let until = Instant::now() + Duration::from_millis(500);
                tokio::select! {
                    events = conn.read(until) => {
                        for event in events.ok()? {
                            if let Event::Closed(code) = event {
                                let bucket = if code == Some(4001) { &counters.wave_4001 } else { &counters.wave_other };
                                bucket.fetch_add(1, Ordering::Relaxed);
                                return None;
                            }
                        }
                    }
                    _ = go.changed() => break,
                }
            }
            let code = conn.close().await;
            match code {
                Some(4001) => counters.wave_4001.fetch_add(1, Ordering::Relaxed),
                Some(1000) => 0,
                _ => counters.wave_other.fetch_add(1, Ordering::Relaxed),
            };
            Some(Instant::now())
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while connected.load(Ordering::Relaxed) < size as u64 {
        if Instant::now() > deadline {
            return Err(format!(
                "wave: only {} of {size} connected",
                connected.load(Ordering::Relaxed)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    go.send_replace(true);
    let mut last = started;
    for task in tasks {
        if let Ok(Some(done)) = task.await {
            last = last.max(done);
        }
    }
    Ok(last.duration_since(started).as_millis() as u64)
}

/// GET `path` over HTTP/1.1 on loopback; returns the body.
async fn http_get(addr: std::net::SocketAddr, path: &str, key: &str) -> Result<String, String> {
    let request = async {
        let mut stream = TcpStream::connect(addr).await?;
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: apikey {key}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        std::io::Result::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), request)
        .await
        .map_err(|_| format!("GET {path}: timed out"))?
        .map_err(|e| format!("GET {path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET {path}: no response"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {path}: {head}"));
    }
    Ok(body.to_owned())
}

async fn stats(addr: std::net::SocketAddr, key: &str) -> Result<Value, String> {
    let body = http_get(addr, "/stats", key).await?;
    serde_json::from_str(&body).map_err(|e| format!("/stats: {e}"))
}

async fn soak(args: &Args) -> Result<bool, String> {
    let (addr, _) = parse_url(&args.string("url", "ws://127.0.0.1:3030/ws"))?;
    let pid = args.number("server-pid", 0)? as u32;
    let key = args.string("api-key", "soak");
    let duration = Duration::from_secs(args.number("duration", 60)?);
    let stayers = args.number("stayers", 100)? as usize;
    let churners = args.number("churners", 100)?;
    let rooms = args.number("rooms", 20)?;
    let rate = args.number("rate", 100)?;
    let wave_size = args.number("wave", 2000)? as usize;
    let abrupt = args.number("abrupt-percent", 25)?;
    // Fails at once if the server is not there or the key is wrong.
    stats(addr, &key).await?;
    http_get(addr, "/api/presence/soak:room-0", &key).await?;
    let rss_base = process_rss_kib(pid).unwrap_or(0);
    let cpu_base = process_cpu(pid).unwrap_or_default();
    let counters = Arc::new(Counters::default());

    // RSS peak, sampled every 100 ms.
    let rss_peak = Arc::new(AtomicU64::new(rss_base));
    let sampling = {
        let rss_peak = Arc::clone(&rss_peak);
        tokio::spawn(async move {
            loop {
                if let Some(rss) = process_rss_kib(pid) {
                    rss_peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let (stop_stayers, stayers_stop) = watch::channel(false);
    let stayer_tasks: Vec<_> = (0..stayers)
        .map(|_| tokio::spawn(stayer(addr, stayers_stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stop_publisher = Arc::new(AtomicBool::new(false));
    let publishing = tokio::spawn(publisher(
        addr,
        rate,
        Arc::clone(&counters),
        Arc::clone(&stop_publisher),
    ));
    let stop_churn = Arc::new(AtomicBool::new(false));
    let churn: Vec<_> = (0..churners)
        .map(|i| {
            tokio::spawn(churner(
                addr,
                i + 1,
                rooms,
                abrupt,
                Arc::clone(&counters),
                Arc::clone(&stop_churn),
            ))
        })
        .collect();

    let started = Instant::now();
    tokio::time::sleep(duration / 2).await;
    let wave_ms = if wave_size > 0 {
        counters.pause.store(true, Ordering::Relaxed);
        // Churners finish what they are doing (at most 2 s).
        tokio::time::sleep(Duration::from_secs(3)).await;
        let before = process_cpu(pid).unwrap_or_default();
        let ms = wave(addr, wave_size, Arc::clone(&counters)).await;
        counters.pause.store(false, Ordering::Relaxed);
        let ms = ms?;
        let cpu = process_cpu(pid).unwrap_or_default().saturating_sub(before);
        eprintln!(
            "wave of {wave_size}: closed in {ms} ms; server CPU for connect + close {:.2} s; RSS peak so far {} KiB",
            cpu.as_secs_f64(),
            rss_peak.load(Ordering::Relaxed)
        );
        ms
    } else {
        0
    };
    tokio::time::sleep(duration.saturating_sub(started.elapsed())).await;

    stop_churn.store(true, Ordering::Relaxed);
    for task in churn {
        let _ = task.await;
    }
    stop_publisher.store(true, Ordering::Relaxed);
    let published = publishing.await.map_err(|e| e.to_string())?;
    // Let the last publications reach the stayers.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_stayers.send_replace(true);
    let mut seen = Vec::with_capacity(stayers);
    for task in stayer_tasks {
        seen.push(task.await.map_err(|e| e.to_string())?);
    }
    let last_acked = counters.last_acked.load(Ordering::Relaxed);

    // The server must come back to nothing.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut end = stats(addr, &key).await?;
    while (end["connections"] != 0 || end["active_tasks"].as_u64().unwrap_or(99) > 1)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        end = stats(addr, &key).await?;
    }
    let mut presence_left = 0;
    for room in 0..rooms {
        let body = http_get(addr, &format!("/api/presence/soak:room-{room}"), &key).await?;
        let value: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        presence_left += value["clients"].as_array().map_or(0, Vec::len);
    }
    // Give the allocator a moment, then read RSS.
    tokio::time::sleep(Duration::from_secs(3)).await;
    sampling.abort();
    let rss_end = process_rss_kib(pid).unwrap_or(0);
    let rss_peak = rss_peak.load(Ordering::Relaxed);
    let cpu = process_cpu(pid)
        .unwrap_or_default()
        .saturating_sub(cpu_base);

    let lost: u64 = seen.iter().map(|s| s.lost).sum();
    let duplicates: u64 = seen.iter().map(|s| s.duplicates).sum();
    let closed = seen.iter().filter(|s| s.closed_by_server.is_some()).count();
    let behind = seen.iter().filter(|s| s.last < last_acked).count();
    let received: u64 = seen.iter().map(|s| s.received).sum();
    let c = &counters;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    // "Near its baseline": everything the run added beyond 32 MiB or a quarter of the peak
    // growth, whichever is larger, counts as not given back.
    let allowed = rss_base + (32 * 1024).max((rss_peak.saturating_sub(rss_base)) / 4);
    let mut failures = Vec::new();
    if let Err(err) = &published {
        failures.push(format!("publisher: {err}"));
    }
    if lost > 0 || duplicates > 0 || behind > 0 {
        failures.push(format!(
            "stayers lost {lost}, got {duplicates} twice, {behind} ended before offset {last_acked}"
        ));
    }
    if closed > 0 {
        failures.push(format!("{closed} stayers were closed by the server"));
    }
    if load(&c.wave_connect_failures) > 0 {
        failures.push(format!(
            "{} wave clients could not connect",
            load(&c.wave_connect_failures)
        ));
    }
    if load(&c.wave_4001) > 0 || load(&c.churn_4001) > 0 {
        failures.push("clients closed as slow consumers (4001)".into());
    }
    if end["connections"] != 0 || end["active_tasks"].as_u64().unwrap_or(99) > 1 {
        failures.push(format!("not back to 0 connections/tasks: {end}"));
    }
    if presence_left > 0 {
        failures.push(format!("{presence_left} presence entries left"));
    }
    if rss_end > allowed {
        failures.push(format!(
            "RSS {rss_end} KiB at the end, baseline {rss_base} KiB (allowed {allowed})"
        ));
    }
    if load(&c.connects) == 0 || received == 0 {
        failures.push("nothing happened".into());
    }
    for failure in &failures {
        eprintln!("soak: FAILED: {failure}");
    }
    println!(
        "RESULT duration_s={} stayers={stayers} churners={churners} connects={} connect_failures={} clean_closes={} abrupt_drops={} published={} publish_errors={} last_offset={last_acked} stayer_received={received} stayer_lost={lost} stayer_duplicates={duplicates} stayers_closed={closed} wave={wave_size} wave_close_ms={wave_ms} wave_4001={} wave_other={} churn_4001={} end_connections={} end_tasks={} presence_left={presence_left} slow_consumer_closes={} notices_dropped={} rss_base_kib={rss_base} rss_peak_kib={rss_peak} rss_end_kib={rss_end} server_cpu_s={:.1} ok={}",
        duration.as_secs(),
        load(&c.connects),
        load(&c.connect_failures),
        load(&c.clean_closes),
        load(&c.abrupt_drops),
        load(&c.published),
        load(&c.publish_errors),
        load(&c.wave_4001),
        load(&c.wave_other),
        load(&c.churn_4001),
        end["connections"],
        end["active_tasks"],
        end["slow_consumer_closes_total"],
        end["notices_dropped_total"],
        cpu.as_secs_f64(),
        failures.is_empty(),
    );
    Ok(failures.is_empty())
}
