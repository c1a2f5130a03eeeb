//! The sender-only ceiling of this machine: how many pre-encoded WebSocket frames one thread can
//! hand to the kernel per second over loopback, with 1, 32 or 256 frames per syscall.
//!
//! No server, no parsing, no queues, no wake-ups: one sender thread writes the same ~200-byte
//! text frame (a server-to-client frame the size of a legacy `Chat` or a v1 publication) to N
//! loopback sockets in turn, `--batch` frames per `writev` (one iovec per frame, all pointing
//! at the one shared frame, as a fan-out of a shared `Bytes` would), while reader threads drain
//! the other ends. A broadcast server does this and more per delivery, so frames per sender
//! CPU-second here bound its deliveries per server CPU-second at the same batching; the
//! distance of a measured figure to this one is what the server's own work costs.
//!
//! Blocking sockets: a full socket makes the sender sleep until a reader drains it, which shows
//! as wall-clock time but not as sender CPU time, so both rates are reported.
//!
//! `--write splice` is a measured prototype of zero-copy fan-out (issue 19): each pass
//! over the sockets encodes its batch once into fresh pages, and every socket gets those pages
//! by reference (`vmsplice` into a pipe, `splice` from the pipe to the socket) instead of a
//! copy into its own socket buffer. The kernel's copy into fresh, cache-cold socket-buffer
//! pages is the largest part of a delivery's cost in a profile of a burst to 10,000 subscribers
//! (40 %, docs/BENCHMARKS.md); this measures what is left without it. The server does not do
//! this (see [`zero_copy`]).

use std::io::{IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusty_bench::Args;

const HELP: &str = "\
sender-ceiling [--connections 1000] [--batches 1,32,256] [--seconds 5] [--size 200] [--readers 1]
               [--sender-cpu 1] [--reader-cpus 0] [--write writev|splice]

One thread writes pre-encoded text frames of --size bytes (header included) to --connections
loopback sockets in turn, each batch of frames with one writev; --readers threads drain the other
ends. Runs each batch size for --seconds and prints, per batch size, frames/s and syscalls/s
(wall clock) and frames per sender CPU-second (the sender thread's own user+system time).
--sender-cpu and --reader-cpus pin the threads with `taskset` (as bench/run.sh pins the server
to CPU 1 and the load generator to CPU 0); an empty value leaves a thread unpinned.
--write splice (a prototype, Linux only) hands each pass's batch, encoded once into fresh pages,
to every socket by reference with vmsplice and splice instead of copying it with writev.

Output: one line per batch size starting with RESULT.";

/// CPU time (user + system) of the calling thread, from `/proc/thread-self/stat`.
fn thread_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on Linux.
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Pins the calling thread to `cpus` (a `taskset` list) by running `taskset -pc` on its id.
fn pin_this_thread(cpus: &str) -> Result<(), String> {
    if cpus.is_empty() {
        return Ok(());
    }
    let link = std::fs::read_link("/proc/thread-self").map_err(|e| e.to_string())?;
    let tid = link
        .file_name()
        .and_then(|t| t.to_str())
        .ok_or("no thread id in /proc/thread-self")?;
    let status = std::process::Command::new("taskset")
        .args(["-pc", cpus, tid])
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("taskset: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("taskset -pc {cpus} {tid} failed"))
    }
}

/// An unmasked server-to-client text frame of exactly `size` bytes, header included.
fn frame(size: usize) -> Result<Vec<u8>, String> {
    let header = match size {
        0..=1 => return Err("--size must be at least 2".into()),
        2..=127 => 2,
        128..=65_539 => 4,
        _ => return Err("--size must be at most 65539".into()),
    };
    let payload = size - header;
    let mut out = vec![0x81];
    if header == 2 {
        out.push(payload as u8);
    } else {
        out.push(126);
        out.extend_from_slice(&(payload as u16).to_be_bytes());
    }
    // JSON-looking filler, so nothing along the path could take a shortcut on zeros.
    let body =
        br#"{"type":"Chat","sender":"bench","content":"0123456789abcdefghijklmnopqrstuvwxyz"}"#;
    out.extend(body.iter().cycle().take(payload));
    Ok(out)
}

/// Writes `batch` copies of `frame` completely; returns the number of `writev` calls it took.
fn write_batch(stream: &mut TcpStream, frame: &[u8], batch: usize) -> std::io::Result<u64> {
    let mut slices: Vec<IoSlice<'_>> = vec![IoSlice::new(frame); batch];
    let mut rest: &mut [IoSlice<'_>] = &mut slices;
    let mut calls = 0;
    while !rest.is_empty() {
        let n = stream.write_vectored(rest)?;
        calls += 1;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(calls)
}

/// What one run at one batch size measured.
struct Measured {
    frames: u64,
    calls: u64,
    wall: Duration,
    cpu: Duration,
}

/// How the sender hands frames to the kernel.
#[derive(Clone, Copy, PartialEq)]
enum WritePath {
    /// `writev`, one slice per frame: the kernel copies them into each socket's buffer.
    Writev,
    /// `vmsplice` + `splice` from pages encoded once per pass: no copy per socket.
    Splice,
}

fn run(
    streams: &mut [TcpStream],
    frame: &[u8],
    batch: usize,
    seconds: u64,
    write: WritePath,
) -> Result<Measured, String> {
    let pipe = match write {
        WritePath::Splice => {
            Some(zero_copy::Pipe::new(batch * frame.len()).map_err(|e| format!("pipe: {e}"))?)
        }
        WritePath::Writev => None,
    };
    let cpu_start = thread_cpu().ok_or("no /proc/thread-self/stat")?;
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    let (mut frames, mut calls) = (0u64, 0u64);
    while Instant::now() < until {
        if let Some(pipe) = &pipe {
            // One encoding per pass, in pages no one writes again, shared by every socket.
            let pages = zero_copy::Pages::filled(frame, batch).map_err(|e| format!("mmap: {e}"))?;
            for stream in streams.iter() {
                calls += pipe
                    .send(&pages, stream)
                    .map_err(|e| format!("splice: {e}"))?;
                frames += batch as u64;
            }
            continue;
        }
        for stream in streams.iter_mut() {
            calls += write_batch(stream, frame, batch).map_err(|e| format!("write: {e}"))?;
            frames += batch as u64;
        }
    }
    let wall = start.elapsed();
    let cpu = thread_cpu().ok_or("no /proc/thread-self/stat")? - cpu_start;
    Ok(Measured {
        frames,
        calls,
        wall,
        cpu,
    })
}

/// N connected loopback pairs: the sending ends, and the receiving ends spread over `readers`
/// threads that drain them (nonblocking, polling in turn) until `stop`.
fn pairs(
    connections: usize,
    readers: usize,
    reader_cpus: &str,
    stop: &Arc<AtomicBool>,
    drained: &Arc<AtomicU64>,
) -> Result<(Vec<TcpStream>, Vec<std::thread::JoinHandle<()>>), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let mut senders = Vec::with_capacity(connections);
    let mut receivers: Vec<Vec<TcpStream>> = (0..readers).map(|_| Vec::new()).collect();
    for i in 0..connections {
        let sender = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        let (receiver, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        sender.set_nodelay(true).map_err(|e| e.to_string())?;
        receiver.set_nonblocking(true).map_err(|e| e.to_string())?;
        senders.push(sender);
        receivers[i % readers].push(receiver);
    }
    let threads = receivers
        .into_iter()
        .map(|mut mine| {
            let stop = Arc::clone(stop);
            let drained = Arc::clone(drained);
            let cpus = reader_cpus.to_owned();
            std::thread::spawn(move || {
                if let Err(err) = pin_this_thread(&cpus) {
                    eprintln!("sender-ceiling: reader not pinned: {err}");
                }
                let mut buf = vec![0u8; 256 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    let mut idle = true;
                    for stream in &mut mine {
                        while let Ok(n @ 1..) = stream.read(&mut buf) {
                            drained.fetch_add(n as u64, Ordering::Relaxed);
                            idle = false;
                        }
                    }
                    if idle {
                        std::thread::yield_now();
                    }
                }
            })
        })
        .collect();
    Ok((senders, threads))
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv
        .first()
        .is_some_and(|a| matches!(a.as_str(), "-h" | "--help" | "help"))
    {
        println!("{HELP}");
        return;
    }
    if let Err(err) = Args::parse(argv.into_iter()).and_then(|args| measure(&args)) {
        eprintln!("sender-ceiling: {err}");
        std::process::exit(2);
    }
}

fn measure(args: &Args) -> Result<(), String> {
    let connections = args.number("connections", 1000)? as usize;
    let seconds = args.number("seconds", 5)?;
    let size = args.number("size", 200)? as usize;
    let readers = args.number("readers", 1)?.max(1) as usize;
    let batches: Vec<usize> = args
        .string("batches", "1,32,256")
        .split(',')
        .map(|b| {
            b.trim()
                .parse()
                .ok()
                .filter(|&n: &usize| (1..=1024).contains(&n))
                .ok_or_else(|| format!("--batches: {b:?} is not a number from 1 to 1024"))
        })
        .collect::<Result<_, _>>()?;
    if connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    let frame = frame(size)?;
    let stop = Arc::new(AtomicBool::new(false));
    let drained = Arc::new(AtomicU64::new(0));
    let reader_cpus = args.string("reader-cpus", "0");
    let write = match args.string("write", "writev").as_str() {
        "writev" => WritePath::Writev,
        "splice" => WritePath::Splice,
        other => return Err(format!("--write must be writev or splice, got {other:?}")),
    };
    let (mut streams, readers) = pairs(connections, readers, &reader_cpus, &stop, &drained)?;
    pin_this_thread(&args.string("sender-cpu", "1"))?;
    println!(
        "sender-ceiling: {connections} loopback sockets, {size}-byte frames, {} reader thread(s), {seconds} s per batch size, {}",
        readers.len(),
        write.name()
    );
    let mut outcome = Ok(());
    for batch in batches {
        let m = match run(&mut streams, &frame, batch, seconds, write) {
            Ok(m) => m,
            Err(err) => {
                outcome = Err(err);
                break;
            }
        };
        let per_sec = m.frames as f64 / m.wall.as_secs_f64();
        let calls_per_sec = m.calls as f64 / m.wall.as_secs_f64();
        let per_cpu = m.frames as f64 / m.cpu.as_secs_f64().max(0.01);
        println!(
            "batch {batch}: {} frames in {:.2} s = {per_sec:.0} frames/s, {calls_per_sec:.0} syscalls/s; sender CPU {:.2} s = {per_cpu:.0} frames per sender CPU-second",
            m.frames,
            m.wall.as_secs_f64(),
            m.cpu.as_secs_f64()
        );
        println!(
            "RESULT sender batch={batch} frames_per_sec={per_sec:.0} syscalls_per_sec={calls_per_sec:.0} frames_per_cpu_sec={per_cpu:.0} connections={connections} size={size} write={}",
            write.name()
        );
    }
    // The readers see every byte written only after the sender is done; they stop here.
    drop(streams);
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        let _ = reader.join();
    }
    eprintln!(
        "sender-ceiling: readers drained {} bytes",
        drained.load(Ordering::Relaxed)
    );
    outcome
}

impl WritePath {
    fn name(self) -> &'static str {
        match self {
            WritePath::Writev => "writev",
            WritePath::Splice => "splice",
        }
    }
}

/// The zero-copy prototype: pages handed to sockets by reference.
///
/// Why only here and not in the server: a page given to `vmsplice` stays referenced by every
/// socket buffer it went to until each reader has read it, and nothing tells the sender when
/// that is. The server would have to encode each batch into pages it never writes or reuses
/// (fresh `mmap`, `munmap` once every subscriber has it), keep a pipe per connection with a
/// partial write pending, and fall back to copies for TLS and compressed frames. This measures
/// whether that is worth it before anyone builds it.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod zero_copy {
    use std::io;
    use std::net::TcpStream;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// A fresh anonymous mapping holding one pass's frames; unmapped on drop (the kernel keeps
    /// the pages alive for as long as a pipe or socket buffer still refers to them).
    pub struct Pages {
        ptr: *mut u8,
        len: usize,
    }

    impl Pages {
        /// `batch` copies of `frame`, contiguous, in pages of their own.
        pub fn filled(frame: &[u8], batch: usize) -> io::Result<Pages> {
            let len = frame.len() * batch;
            // SAFETY: a private anonymous mapping at an address the kernel picks; the result is
            // checked before use.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let pages = Pages {
                ptr: ptr.cast(),
                len,
            };
            // SAFETY: `ptr` is a fresh, writable mapping of `len` bytes that nothing else uses.
            let bytes = unsafe { std::slice::from_raw_parts_mut(pages.ptr, len) };
            for chunk in bytes.chunks_mut(frame.len()) {
                chunk.copy_from_slice(frame);
            }
            Ok(pages)
        }
    }

    impl Drop for Pages {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping `filled` made; nothing refers to it afterwards
            // but the kernel's own page references.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    /// One pipe, reused for every socket: filled by reference, emptied into the socket.
    pub struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        /// Bytes the pipe holds.
        capacity: usize,
    }

    impl Pipe {
        pub fn new(want: usize) -> io::Result<Pipe> {
            let mut fds = [0; 2];
            // SAFETY: `fds` has room for the two descriptors pipe2 writes.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: pipe2 succeeded, so both are open descriptors that nothing else owns.
            let (read, write) =
                unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            // Two pages more than asked for: an unaligned span takes a slot per page it touches.
            let size = (want + 2 * 4096).clamp(64 * 1024, 1024 * 1024);
            // SAFETY: F_SETPIPE_SZ on our own pipe; the kernel returns the size it set.
            let set =
                unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
            if set < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Pipe {
                read,
                write,
                capacity: set as usize - 2 * 4096,
            })
        }

        /// Hands all of `pages` to `stream` by reference; returns the system calls it took.
        /// After an error the pipe may still hold bytes meant for `stream`: drop it then
        /// (`run` does, by ending the measurement).
        pub fn send(&self, pages: &Pages, stream: &TcpStream) -> io::Result<u64> {
            let mut calls = 0;
            let mut offset = 0;
            while offset < pages.len {
                let chunk = (pages.len - offset).min(self.capacity);
                let iov = libc::iovec {
                    // SAFETY (of the add): `offset < len`, inside the mapping.
                    iov_base: unsafe { pages.ptr.add(offset) }.cast(),
                    iov_len: chunk,
                };
                // SAFETY: the iovec points into a live mapping that is never written again;
                // NONBLOCK because this thread is the pipe's only reader.
                let moved = unsafe {
                    libc::vmsplice(self.write.as_raw_fd(), &iov, 1, libc::SPLICE_F_NONBLOCK)
                };
                calls += 1;
                if moved < 0 {
                    return Err(io::Error::last_os_error());
                }
                if moved == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                let mut left = moved as usize;
                while left > 0 {
                    // SAFETY: plain descriptors, no user memory; a blocking socket makes this
                    // wait for room as writev would.
                    let n = unsafe {
                        libc::splice(
                            self.read.as_raw_fd(),
                            std::ptr::null_mut(),
                            stream.as_raw_fd(),
                            std::ptr::null_mut(),
                            left,
                            libc::SPLICE_F_MOVE,
                        )
                    };
                    calls += 1;
                    if n < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    if n == 0 {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    left -= n as usize;
                }
                offset += moved as usize;
            }
            Ok(calls)
        }
    }
}

/// Elsewhere than Linux there is no `vmsplice`: `--write splice` reports that.
#[cfg(not(target_os = "linux"))]
mod zero_copy {
    use std::io;
    use std::net::TcpStream;

    pub struct Pages;
    pub struct Pipe;

    fn unsupported<T>() -> io::Result<T> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "vmsplice and splice are Linux only",
        ))
    }

    impl Pages {
        pub fn filled(_: &[u8], _: usize) -> io::Result<Pages> {
            unsupported()
        }
    }

    impl Pipe {
        pub fn new(_: usize) -> io::Result<Pipe> {
            unsupported()
        }
        pub fn send(&self, _: &Pages, _: &TcpStream) -> io::Result<u64> {
            unsupported()
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// A connected loopback pair: (sending end, receiving end).
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let sender = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (receiver, _) = listener.accept().expect("accept");
        receiver
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        (sender, receiver)
    }

    fn read_exactly(receiver: &mut TcpStream, len: usize) -> Vec<u8> {
        let mut got = vec![0; len];
        receiver.read_exact(&mut got).expect("all the bytes arrive");
        got
    }

    #[test]
    fn spliced_pages_arrive_intact_even_after_they_are_unmapped_and_replaced() {
        let (sender, mut receiver) = pair();
        let pipe = zero_copy::Pipe::new(0).expect("pipe");
        let first = zero_copy::Pages::filled(b"first frame!", 1000).expect("mmap");
        assert!(
            pipe.send(&first, &sender).expect("splice") >= 2,
            "a vmsplice and a splice at least"
        );
        // The socket buffer still refers to those pages; unmapping them and writing new ones
        // (likely at the same address) must not change what the reader gets.
        drop(first);
        let second = zero_copy::Pages::filled(b"SECOND", 2000).expect("mmap");
        pipe.send(&second, &sender).expect("splice");
        drop(second);
        assert_eq!(
            read_exactly(&mut receiver, 12_000),
            b"first frame!".repeat(1000)
        );
        assert_eq!(read_exactly(&mut receiver, 12_000), b"SECOND".repeat(2000));
    }

    #[test]
    fn a_batch_larger_than_the_pipe_goes_in_several_splices() {
        let (sender, mut receiver) = pair();
        let pipe = zero_copy::Pipe::new(0).expect("pipe");
        let frame = frame(200).expect("frame");
        let reader = std::thread::spawn(move || read_exactly(&mut receiver, 200 * 2000));
        let pages = zero_copy::Pages::filled(&frame, 2000).expect("mmap");
        let calls = pipe.send(&pages, &sender).expect("splice");
        assert!(
            calls >= 14,
            "400 KB through a pipe of at most 64 KiB: a vmsplice and a splice per 64 KiB at least, {calls} calls"
        );
        assert_eq!(reader.join().expect("reader"), frame.repeat(2000));
    }
}
