//! Load generator for Rusty Socks and its peers: `broadcast`, `echo` and `connect` scenarios.
//!
//! Every scenario is bounded in count and time and talks to loopback only. Run with `--help`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusty_bench::{
    Args, Latencies, each_frame, each_frame_raw, encode_frame, inflate_message, parse_url,
    process_cpu, process_rss_kib, ws_connect, ws_connect_with_headers, ws_handshake,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

const HELP: &str = "loadgen - load generator for WebSocket broadcast servers (loopback only)

USAGE:
  loadgen broadcast --url ws://127.0.0.1:3030/ws[,ws://...] [--subscribers 1000] [--publishers 1]
                    [--messages 2000] [--size 64] [--rate 0] [--window 256]
                    [--stalled 0] [--server-pid PID] [--timeout 60] [--deflate [--inflate-every 1]]
                    [--dialect legacy|v1] [--channel bench]
                    [--before-burst CMD] [--after-burst CMD] [--warmup 0]
      N subscribers and P publishers connect; each publisher sends --messages JSON chat
      messages of --size bytes ({\"sender\":..,\"content\":..}); every one must reach every
      subscriber. --rate is messages/s per publisher (0 = flat out, at most --window messages
      ahead of the slowest subscriber). Reports deliveries/s, deliveries per server
      CPU-second (with --server-pid), publish->delivery latency p50/p99/p999, and lost messages.
      --deflate makes subscribers offer permessage-deflate and inflate what comes compressed
      (RESULT's wire_bytes_per_delivery shows what it saved). --inflate-every K (one publisher
      only) makes only every K-th subscriber inflate and check each message; the others count
      compressed frames as deliveries, so one generator core can keep up with the server.
      --stalled K adds K subscribers that connect and never read: the others' figures show
      what such clients cost them. --dialect v1 connects with the rusty-socks.v1 subprotocol:
      subscribers subscribe to --channel (and wait for `subscribed`), publishers send each
      chat message as the `data` of a v1 `publish` to it. Several --url values (comma-separated nodes of one
      cluster) spread the subscribers over the nodes; publishers use the first. --server-pid
      takes a comma-separated list too, and CPU is summed over those processes.
      --before-burst / --after-burst run a shell command (sh -c) right before the first
      message is sent and right after the last one arrived, while every connection is still
      open: bench/callgrind.sh zeroes and dumps the server's instruction counts there, so
      connecting and closing are not counted. --warmup N makes each publisher send N messages
      first, on the same connections, and waits until every subscriber has them before the
      hook runs and measuring starts: the measured burst then finds its sockets warm.

  loadgen echo --url ws://127.0.0.1:3030/echo [--connections 100] [--window 1] [--size 64]
               [--duration 10] [--server-pid PID]
      Each connection keeps --window messages in flight. Reports echoes/s (and per server
      CPU-second with --server-pid) and round-trip latency p50/p99/p999.

  loadgen connect --url ws://127.0.0.1:3030/ws [--connections 10000] [--concurrency 200]
                  [--hold 5] [--server-pid PID] [--deflate]
      Opens and holds connections. Reports connects/s, failures, and the server's RSS growth
      per connection (VmRSS from /proc/PID/status, before vs. while holding). --deflate offers
      permessage-deflate and counts the connections that negotiated it.

Output ends with one machine-readable line starting with RESULT.";

fn main() {
    let mut argv = std::env::args().skip(1);
    let scenario = argv.next().unwrap_or_default();
    if matches!(scenario.as_str(), "" | "-h" | "--help" | "help") {
        println!("{HELP}");
        return;
    }
    let args = match Args::parse(argv) {
        Ok(args) => args,
        Err(err) => fail(&err),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.number("threads", 1).unwrap_or(1) as usize)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&e.to_string()));
    let outcome = runtime.block_on(async {
        match scenario.as_str() {
            "broadcast" => broadcast(&args).await,
            "echo" => echo(&args).await,
            "connect" => connect(&args).await,
            other => Err(format!("unknown scenario {other:?}; see --help")),
        }
    });
    if let Err(err) = outcome {
        fail(&err);
    }
    // Do not wait for thousands of sockets to close one by one.
    runtime.shutdown_timeout(Duration::from_millis(100));
}

fn fail(message: &str) -> ! {
    eprintln!("loadgen: {message}");
    std::process::exit(2);
}

fn micros_since(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

/// Finds `#b<run>:<publisher>:<seq>:<micros>#` in a frame, parsing digits in place: this runs
/// once per delivery and must cost the generator as little as possible.
fn marker(payload: &[u8], run: u32) -> Option<(usize, u64, u64)> {
    let at = memchr::memmem::find(payload, b"#b")?;
    let mut fields = [0u64; 4];
    let mut index = 0;
    for &byte in &payload[at + 2..] {
        match byte {
            b'0'..=b'9' => fields[index] = fields[index] * 10 + u64::from(byte - b'0'),
            b':' if index < 3 => index += 1,
            b'#' if index == 3 => {
                if fields[0] != u64::from(run) {
                    return None;
                }
                return Some((fields[1] as usize, fields[2], fields[3]));
            }
            _ => return None,
        }
    }
    None
}

fn chat_message(run: u32, publisher: usize, seq: u64, micros: u64, size: usize) -> Vec<u8> {
    let mut text = format!(r##"{{"sender":"p","content":"#b{run}:{publisher}:{seq}:{micros}#"##);
    let closing = "\"}";
    // Filler that compresses like real chat text or JSON (words and numbers, 3-4x with deflate),
    // not like a run of one byte: what `--deflate` measures depends on it.
    const WORDS: [&str; 16] = [
        "price", "volume", "alpha", "quote", "the", "market", "opened", "higher", "on", "news",
        "user", "sent", "hello", "status", "ok", "update",
    ];
    let mut state = seq
        .wrapping_mul(6364136223846793005)
        .wrapping_add(publisher as u64 + 1);
    while text.len() + closing.len() < size {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let word = WORDS[(state >> 60) as usize];
        let filler = format!(" {word}={}", (state >> 40) % 1000);
        let room = size - closing.len() - text.len();
        text.push_str(&filler[..filler.len().min(room)]);
    }
    text.push_str(closing);
    text.into_bytes()
}

/// A v1 `publish` of one chat message (as its `data`) to `channel`.
fn v1_publish(channel: &str, chat: &[u8]) -> Vec<u8> {
    let mut out = format!(r#"{{"type":"publish","channel":"{channel}","data":"#).into_bytes();
    out.extend_from_slice(chat);
    out.push(b'}');
    out
}

/// Connects a subscriber: legacy needs nothing more; v1 subscribes to `channel` and waits for
/// the `subscribed` reply (frames before and including it are consumed).
async fn subscriber_connect(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &str,
    channel: Option<&str>,
) -> Result<(TcpStream, bytes::BytesMut), String> {
    let (mut stream, mut buf) = ws_connect_with_headers(addr, path, headers)
        .await
        .map_err(|e| format!("subscriber connect failed: {e}"))?;
    let Some(channel) = channel else {
        return Ok((stream, buf));
    };
    let mut out = Vec::new();
    let subscribe = format!(r#"{{"type":"subscribe","id":1,"channel":"{channel}"}}"#);
    encode_frame(&mut out, 0x1, subscribe.as_bytes());
    stream
        .write_all(&out)
        .await
        .map_err(|e| format!("subscribe failed: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut done = false;
        let mut refused = None;
        each_frame(&mut buf, |_, payload| {
            if memchr::memmem::find(payload, br#""type":"subscribed""#).is_some() {
                done = true;
            } else if memchr::memmem::find(payload, br#""type":"error""#).is_some() {
                refused = Some(String::from_utf8_lossy(payload).into_owned());
            }
        });
        if let Some(error) = refused {
            return Err(format!("subscribe refused: {error}"));
        }
        if done {
            return Ok((stream, buf));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        buf.reserve(4096);
        match tokio::time::timeout(left, stream.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Ok(_)) | Ok(Err(_)) => return Err("closed before `subscribed`".into()),
            Err(_) => return Err("no `subscribed` reply within 30 s".into()),
        }
    }
}

/// CPU time of every server process together (a cluster's cost).
fn cluster_cpu(pids: &[u32]) -> Option<Duration> {
    pids.iter().map(|&pid| process_cpu(pid)).sum()
}

/// Runs a `--before-burst`/`--after-burst` command and waits for it; a failure ends the run.
fn run_hook(name: &str, command: &str) -> Result<(), String> {
    let status = std::process::Command::new("sh")
        .args(["-c", command])
        .status()
        .map_err(|e| format!("--{name}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("--{name} {command:?} failed: {status}"))
    }
}

struct Subscriber {
    /// Messages received from each publisher, in order.
    progress: Vec<AtomicU64>,
}

async fn broadcast(args: &Args) -> Result<(), String> {
    // Several nodes of one cluster: subscribers are spread over them round-robin; publishers
    // and stalled subscribers use the first.
    let nodes = args
        .string("url", "ws://127.0.0.1:3030/ws")
        .split(',')
        .map(parse_url)
        .collect::<Result<Vec<_>, _>>()?;
    let (addr, path) = nodes[0].clone();
    let subscribers = args.number("subscribers", 1000)? as usize;
    let publishers = args.number("publishers", 1)?.max(1) as usize;
    let messages = args.number("messages", 2000)?;
    // Sent first and not measured: sequence numbers 0..warmup, then the measured burst.
    let warmup = args.number("warmup", 0)?;
    let size = args.number("size", 64)? as usize;
    let rate = args.number("rate", 0)?;
    let window = args.number("window", 256)?.max(1);
    let timeout = Duration::from_secs(args.number("timeout", 60)?);
    let server_pids = args
        .string("server-pid", "0")
        .split(',')
        .map(|pid| {
            pid.parse::<u32>()
                .map_err(|_| format!("--server-pid must be PID[,PID...], got {pid:?}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let stalled = args.number("stalled", 0)? as usize;
    // Subscribers offer permessage-deflate (the server compresses if it runs with
    // RUSTY_SOCKS_COMPRESSION=true); bytes read by subscribers are counted either way.
    let offer = if args.flag("deflate") {
        "permessage-deflate; client_max_window_bits"
    } else {
        ""
    };
    let inflate_every = args.number("inflate-every", 1)?.max(1) as usize;
    if inflate_every > 1 && publishers != 1 {
        return Err(
            "--inflate-every needs --publishers 1 (counted frames name no publisher)".into(),
        );
    }
    let channel = args.string("channel", "bench");
    let v1 = match args.string("dialect", "legacy").as_str() {
        "legacy" => false,
        "v1" => true,
        other => return Err(format!("--dialect must be legacy or v1, got {other:?}")),
    };
    let mut headers = if offer.is_empty() {
        String::new()
    } else {
        format!("Sec-WebSocket-Extensions: {offer}\r\n")
    };
    // Publishers offer no extension (as before): only subscribers' reading is measured.
    let publisher_headers = if v1 {
        "Sec-WebSocket-Protocol: rusty-socks.v1\r\n"
    } else {
        ""
    };
    headers.push_str(publisher_headers);
    let headers: Arc<str> = headers.into();
    let subscribe_to: Option<Arc<str>> = v1.then(|| channel.clone().into());
    let wire_bytes = Arc::new(AtomicU64::new(0));
    let run = (std::process::id() ^ (Instant::now().elapsed().subsec_nanos())) % 1_000_000;
    let start = Instant::now();

    let lost = Arc::new(AtomicU64::new(0));
    let dups = Arc::new(AtomicU64::new(0));
    let mut subs = Vec::new();
    let mut readers = Vec::new();
    let limit = Arc::new(Semaphore::new(200));
    let mut connecting = Vec::new();
    for n in 0..subscribers {
        let limit = Arc::clone(&limit);
        let (addr, path) = nodes[n % nodes.len()].clone();
        let (headers, subscribe_to) = (Arc::clone(&headers), subscribe_to.clone());
        connecting.push(tokio::spawn(async move {
            let _permit = limit.acquire().await;
            subscriber_connect(addr, &path, &headers, subscribe_to.as_deref()).await
        }));
    }
    for (n, handle) in connecting.into_iter().enumerate() {
        let (stream, leftover) = handle.await.map_err(|e| e.to_string())??;
        let sub = Arc::new(Subscriber {
            progress: (0..publishers).map(|_| AtomicU64::new(0)).collect(),
        });
        subs.push(Arc::clone(&sub));
        let (lost, dups) = (Arc::clone(&lost), Arc::clone(&dups));
        let wire_bytes = Arc::clone(&wire_bytes);
        let inflates = n % inflate_every == 0;
        readers.push(tokio::spawn(async move {
            let mut latencies = Latencies::default();
            let mut inflater = flate2::Decompress::new(false);
            let mut inflated = Vec::new();
            let mut buf = leftover;
            let mut stream = stream;
            let expected_total = (warmup + messages) * publishers as u64;
            let mut got = 0u64;
            let mut pongs = Vec::new();
            while got < expected_total {
                buf.reserve(64 * 1024);
                match stream.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        wire_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
                each_frame_raw(&mut buf, |first, payload| {
                    if first & 0x0F == 0x9 {
                        encode_frame(&mut pongs, 0xA, payload);
                        return;
                    }
                    if first & 0x40 != 0 && !inflates {
                        // Only the publications themselves are big enough to be compressed.
                        let progress = &sub.progress[0];
                        progress.store(progress.load(Ordering::Relaxed) + 1, Ordering::Release);
                        got += 1;
                        return;
                    }
                    let payload = if first & 0x40 != 0 {
                        inflate_message(&mut inflater, payload, &mut inflated);
                        &inflated[..]
                    } else {
                        payload
                    };
                    let Some((publisher, seq, sent)) = marker(payload, run) else {
                        return;
                    };
                    let Some(progress) = sub.progress.get(publisher) else {
                        return;
                    };
                    let expected = progress.load(Ordering::Relaxed);
                    if seq < expected {
                        dups.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    if seq > expected {
                        lost.fetch_add(seq - expected, Ordering::Relaxed);
                    }
                    progress.store(seq + 1, Ordering::Release);
                    got += 1 + (seq - expected);
                    if seq >= warmup {
                        latencies.record(micros_since(start).saturating_sub(sent));
                    }
                });
                if !pongs.is_empty() {
                    let _ = stream.write_all(&pongs).await;
                    pongs.clear();
                }
            }
            (latencies, stream)
        }));
    }
    // Connected, never read: held until the end of the run.
    let mut stalled_streams = Vec::with_capacity(stalled);
    for _ in 0..stalled {
        let (stream, _) = subscriber_connect(addr, &path, &headers, subscribe_to.as_deref())
            .await
            .map_err(|e| format!("stalled subscriber: {e}"))?;
        stalled_streams.push(stream);
    }
    let mut publisher_streams = Vec::new();
    for _ in 0..publishers {
        let (stream, _) = ws_connect_with_headers(addr, &path, publisher_headers)
            .await
            .map_err(|e| format!("publisher connect failed: {e}"))?;
        let (mut rd, wr) = stream.into_split();
        // Publishers receive each other's broadcasts: read and discard them.
        tokio::spawn(async move {
            let mut sink = vec![0u8; 64 * 1024];
            while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        publisher_streams.push(wr);
    }
    eprintln!(
        "broadcast: {subscribers} subscribers (+{stalled} stalled), {publishers} publishers connected in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let subs = Arc::new(subs);
    // Publishers wait here after their warm-up until it has reached every subscriber.
    let go = Arc::new(Semaphore::new(0));
    let mut sending = Vec::new();
    for (publisher, mut wr) in publisher_streams.into_iter().enumerate() {
        let subs = Arc::clone(&subs);
        let go = Arc::clone(&go);
        let channel = v1.then(|| channel.clone());
        sending.push(tokio::spawn(async move {
            let interval = (rate > 0).then(|| Duration::from_secs_f64(1.0 / rate as f64));
            let mut next = Instant::now();
            let mut out = Vec::new();
            let mut seq = 0;
            let total = warmup + messages;
            while seq < total {
                if seq == warmup {
                    match go.acquire().await {
                        Ok(permit) => permit.forget(),
                        Err(_) => return seq,
                    }
                    next = Instant::now();
                }
                // Never more than `window` ahead of the slowest subscriber.
                loop {
                    let slowest = subs
                        .iter()
                        .map(|s| s.progress[publisher].load(Ordering::Acquire))
                        .min()
                        .unwrap_or(seq);
                    if seq < slowest + window {
                        break;
                    }
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                // A batch never crosses from the warm-up into the measured burst.
                let batch_end = (seq + 32).min(if seq < warmup { warmup } else { total });
                out.clear();
                while seq < batch_end {
                    let msg = chat_message(run, publisher, seq, micros_since(start), size);
                    match &channel {
                        Some(channel) => encode_frame(&mut out, 0x1, &v1_publish(channel, &msg)),
                        None => encode_frame(&mut out, 0x1, &msg),
                    }
                    seq += 1;
                    if interval.is_some() {
                        break;
                    }
                }
                if wr.write_all(&out).await.is_err() {
                    return seq;
                }
                if let Some(interval) = interval {
                    next += interval;
                    tokio::time::sleep_until(next.into()).await;
                }
            }
            seq
        }));
    }
    if warmup > 0 {
        let deadline = Instant::now() + timeout;
        while subs.iter().any(|s| {
            s.progress
                .iter()
                .any(|p| p.load(Ordering::Acquire) < warmup)
        }) {
            if Instant::now() > deadline {
                return Err(format!(
                    "the {warmup}-message warm-up did not reach every subscriber in {timeout:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Let the last warm-up writes settle before measuring.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if let Some(hook) = args
        .flag("before-burst")
        .then(|| args.string("before-burst", ""))
    {
        run_hook("before-burst", &hook)?;
    }

    let cpu_before = cluster_cpu(&server_pids);
    let own_before = process_cpu(std::process::id());
    let began = Instant::now();
    go.add_permits(publishers);
    for handle in sending {
        let _ = handle.await;
    }
    let mut latencies = Latencies::default();
    let deadline = tokio::time::Instant::now() + timeout;
    // Held open until the server's CPU time is read: a subscriber closed as soon as its
    // reader was merged made the server broadcast its departure (legacy `disconnect`, v1
    // `leave`) to all the others inside the measured window, teardown work that grows with
    // the square of the audience (a tenth of the CPU time at 10,000 subscribers).
    let mut finished = Vec::with_capacity(readers.len());
    for reader in readers {
        match tokio::time::timeout_at(deadline, reader).await {
            Ok(Ok((l, stream))) => {
                latencies.merge(l);
                finished.push(stream);
            }
            _ => break,
        }
    }
    let elapsed = began.elapsed();
    if let Some(hook) = args
        .flag("after-burst")
        .then(|| args.string("after-burst", ""))
    {
        run_hook("after-burst", &hook)?;
    }
    let cpu = match (cpu_before, cluster_cpu(&server_pids)) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let own_busy = match (own_before, process_cpu(std::process::id())) {
        (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64() / elapsed.as_secs_f64() * 100.0,
        _ => 0.0,
    };
    let server_busy = cpu.map_or(0.0, |c| c.as_secs_f64() / elapsed.as_secs_f64() * 100.0);
    drop(stalled_streams);
    drop(finished);
    let expected = messages * publishers as u64 * subscribers as u64;
    let delivered: u64 = subs
        .iter()
        .map(|s| {
            s.progress
                .iter()
                .map(|p| p.load(Ordering::Relaxed))
                .sum::<u64>()
        })
        .sum::<u64>()
        - lost.load(Ordering::Relaxed)
        - warmup * publishers as u64 * subscribers as u64;
    let missing = expected - delivered;
    let (p50, p99, p999) = latencies.percentiles();
    let per_cpu = cpu.map_or(0.0, |c| delivered as f64 / c.as_secs_f64().max(0.001));
    println!(
        "broadcast: delivered {delivered}/{expected} in {:.2}s = {:.0}/s; per server CPU-second {:.0} (cpu {:.2}s); lost {missing}; dup {}; latency p50 {p50}us p99 {p99}us p999 {p999}us",
        elapsed.as_secs_f64(),
        delivered as f64 / elapsed.as_secs_f64(),
        per_cpu,
        cpu.map_or(0.0, |c| c.as_secs_f64()),
        dups.load(Ordering::Relaxed),
    );
    let wire_per_delivery = wire_bytes.load(Ordering::Relaxed) as f64 / delivered.max(1) as f64;
    println!(
        "RESULT broadcast delivered={delivered} expected={expected} secs={:.3} per_sec={:.0} per_cpu_sec={per_cpu:.0} lost={missing} p50_us={p50} p99_us={p99} p999_us={p999} server_busy_pct={server_busy:.0} generator_busy_pct={own_busy:.0} wire_bytes_per_delivery={wire_per_delivery:.0}",
        elapsed.as_secs_f64(),
        delivered as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}

async fn echo(args: &Args) -> Result<(), String> {
    let (addr, path) = parse_url(&args.string("url", "ws://127.0.0.1:3030/echo"))?;
    let connections = args.number("connections", 100)? as usize;
    let window = args.number("window", 1)?.max(1);
    let size = args.number("size", 64)? as usize;
    let duration = Duration::from_secs(args.number("duration", 10)?.clamp(1, 600));
    let server_pid = args.number("server-pid", 0)? as u32;
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (stream, leftover) = ws_connect(addr, &path)
            .await
            .map_err(|e| format!("connect failed: {e}"))?;
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let (mut rd, mut wr) = stream.into_split();
            let mut latencies = Latencies::default();
            let message = |micros: u64| {
                let mut text = format!("#e{micros}#");
                while text.len() < size {
                    text.push('.');
                }
                let mut out = Vec::new();
                encode_frame(&mut out, 0x1, text.as_bytes());
                out
            };
            let mut out = Vec::new();
            for _ in 0..window {
                out.extend(message(micros_since(start)));
            }
            if wr.write_all(&out).await.is_err() {
                return (0u64, latencies);
            }
            let mut buf = leftover;
            let mut echoes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                buf.reserve(16 * 1024);
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                out.clear();
                let now = micros_since(start);
                each_frame(&mut buf, |opcode, payload| {
                    if opcode != 0x1 {
                        return;
                    }
                    let text = std::str::from_utf8(payload).unwrap_or("");
                    if let Some(sent) = text
                        .strip_prefix("#e")
                        .and_then(|t| t.split('#').next())
                        .and_then(|t| t.parse::<u64>().ok())
                    {
                        latencies.record(now.saturating_sub(sent));
                        echoes += 1;
                        out.extend(message(now));
                    }
                });
                if !out.is_empty() && wr.write_all(&out).await.is_err() {
                    break;
                }
            }
            (echoes, latencies)
        }));
    }
    let began = Instant::now();
    let cpu_before = process_cpu(server_pid);
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = began.elapsed();
    let cpu = match (cpu_before, process_cpu(server_pid)) {
        (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64(),
        _ => 0.0,
    };
    let mut total = 0;
    let mut latencies = Latencies::default();
    for task in tasks {
        if let Ok(Ok((n, l))) = tokio::time::timeout(Duration::from_secs(2), task).await {
            total += n;
            latencies.merge(l);
        }
    }
    let (p50, p99, p999) = latencies.percentiles();
    let per_sec = total as f64 / elapsed.as_secs_f64();
    let per_cpu = total as f64 / cpu.max(0.001);
    let busy = cpu / elapsed.as_secs_f64() * 100.0;
    println!(
        "echo: {connections} connections, window {window}: {total} echoes in {:.2}s = {per_sec:.0}/s ({per_cpu:.0} per server CPU-second); latency p50 {p50}us p99 {p99}us p999 {p999}us",
        elapsed.as_secs_f64()
    );
    println!(
        "RESULT echo per_sec={per_sec:.0} per_cpu_sec={per_cpu:.0} server_busy_pct={busy:.0} p50_us={p50} p99_us={p99} p999_us={p999}"
    );
    Ok(())
}

async fn connect(args: &Args) -> Result<(), String> {
    let (addr, path) = parse_url(&args.string("url", "ws://127.0.0.1:3030/ws"))?;
    let connections = args.number("connections", 10_000)? as usize;
    let concurrency = args.number("concurrency", 200)?.max(1) as usize;
    let hold = Duration::from_secs(args.number("hold", 5)?.clamp(1, 120));
    let server_pid = args.number("server-pid", 0)? as u32;
    let rss_before = process_rss_kib(server_pid);
    let cpu_before = process_cpu(server_pid);
    let offer = if args.flag("deflate") {
        "permessage-deflate; client_max_window_bits"
    } else {
        ""
    };
    let limit = Arc::new(Semaphore::new(concurrency));
    let began = Instant::now();
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let limit = Arc::clone(&limit);
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire().await;
            ws_handshake(addr, &path, offer)
                .await
                .map(|(stream, _, head)| {
                    let negotiated = head
                        .to_ascii_lowercase()
                        .contains("sec-websocket-extensions: permessage-deflate");
                    (stream, negotiated)
                })
        }));
    }
    let mut held = Vec::with_capacity(connections);
    let mut deflating = 0;
    let mut failures = 0;
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok(Ok((stream, negotiated))) => {
                deflating += usize::from(negotiated);
                held.push(stream);
            }
            Ok(Err(e)) => {
                failures += 1;
                first_error.get_or_insert(e.to_string());
            }
            Err(e) => {
                failures += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let elapsed = began.elapsed();
    let cpu = match (cpu_before, process_cpu(server_pid)) {
        (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64(),
        _ => 0.0,
    };
    let per_cpu = held.len() as f64 / cpu.max(0.001);
    tokio::time::sleep(hold).await;
    let rss_after = process_rss_kib(server_pid);
    let per_conn = match (rss_before, rss_after) {
        (Some(a), Some(b)) if !held.is_empty() => {
            (b.saturating_sub(a)) as f64 * 1024.0 / held.len() as f64
        }
        _ => 0.0,
    };
    let rate = held.len() as f64 / elapsed.as_secs_f64();
    println!(
        "connect: {} of {connections} connected ({deflating} with deflate) in {:.2}s = {rate:.0}/s ({per_cpu:.0} per server CPU-second); {failures} failed{}; server RSS {} -> {} KiB = {per_conn:.0} bytes per connection",
        held.len(),
        elapsed.as_secs_f64(),
        first_error
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        rss_before.unwrap_or(0),
        rss_after.unwrap_or(0),
    );
    println!(
        "RESULT connect ok={} deflate={deflating} failed={failures} per_sec={rate:.0} per_cpu_sec={per_cpu:.0} rss_per_conn_bytes={per_conn:.0}",
        held.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip() {
        let msg = chat_message(7, 2, 41, 123_456, 64);
        assert_eq!(msg.len(), 64);
        assert_eq!(marker(&msg, 7), Some((2, 41, 123_456)));
        assert_eq!(marker(&msg, 8), None, "another run's message");
        assert_eq!(marker(b"no marker here", 7), None);
    }

    #[test]
    fn v1_publishes_carry_the_chat_message_as_data() {
        let msg = chat_message(7, 0, 3, 99, 64);
        let frame = v1_publish("bench", &msg);
        let value: serde_json::Value = serde_json::from_slice(&frame).expect("json");
        assert_eq!(value["type"], "publish");
        assert_eq!(value["channel"], "bench");
        assert_eq!(
            value["data"],
            serde_json::from_slice::<serde_json::Value>(&msg).expect("json")
        );
        assert_eq!(marker(&frame, 7), Some((0, 3, 99)));
    }
}
