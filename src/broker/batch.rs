//! Coalescing what a networked broker delivers, so subscribers are woken once per batch.
//!
//! The memory broker hands the node a publisher's whole read (up to 256 publications) before
//! any subscriber runs, so every subscriber's writer is woken once and writes them all with
//! one syscall. Through Redis or NATS, publications arrive one at a time on the receive task
//! (a publisher waits for each publish's reply, so one is in flight per publisher), and
//! delivering each at once wakes every subscriber per publication: a wake-up, a task poll and
//! a `sendto` per delivery, about 6-9× the memory broker's cost per delivery.
//!
//! A [`Batch`] holds what the receive task got (publications, gaps, joins and leaves, in the
//! order they arrived) while the broker is streaming, and hands it to [`BrokerEvents`] in one
//! go when the batch is full ([`MAX_HELD`]) or its deadline ([`WINDOW`] after the first held
//! event, rounded up to the runtime timer's millisecond) passes. An event that arrives after
//! a quiet spell (nothing for [`QUIET`]) is delivered at once, so sparse traffic keeps its
//! latency; events that follow each other closer than that wait up to about 2 ms (longer while
//! a pipeline is waited for, below: up to [`RUN_WAIT`]). The quiet spell is long on purpose:
//! while a batch's subscribers write, the next publication waits behind them on the node
//! (1,000 subscribers take milliseconds), and a short one would take every such stream for
//! sparse traffic and deliver it one publication at a time again.
//!
//! A pipeline's first publication is announced with how many were sent together (NATS: the
//! `Rs-Run` header, passed to [`Batch::arrived`]; Redis: an `r|<n>|<offset>` message its
//! script publishes right before it, passed to [`Batch::announce`]; see
//! [`crate::broker::wire`]). The batch then waits for the pipeline's last offset (at most
//! [`RUN_WAIT`]), even after a quiet spell, so the pipeline wakes each subscriber once rather
//! than once per piece the broker's timing cut it into. Through Redis that matters most: every
//! publish is a script (about 24 µs each on the benchmark machine), so a pipeline of 256 runs
//! for about 6 ms, several of the usual windows.
//!
//! In a stream of pipelines (a pipeline whose first publication arrived less than [`QUIET`]
//! after its channel's previous pipeline was complete), the batch still waits
//! [`FOLLOW`] for the next pipeline once those it waits for have all arrived, unless that
//! would pass [`RUN_WAIT`] after its first event. A publisher that sends in bulk sends its
//! next pipeline as soon as the previous one is answered, which is when that one's last
//! publication reaches the nodes. Delivered without that wait, a stream of pipelines reaches
//! each subscriber as one write per pipeline, and pipelines are short: the publisher's
//! messages are split between the one the broker runs and the one the node writes out.
//! Waiting for the next one doubles what each write carries (measured, 1,000 subscribers:
//! 6.2-7.1 `writev` per 1,000 deliveries without it, 4.0-4.4 with it, the memory broker's 4.0;
//! docs/BENCHMARKS.md, "Issue 19: the next pipeline waited for, and a full run"). The cost:
//! in such a stream, each batch is delivered up to [`FOLLOW`] after its last pipeline
//! arrived, and whatever else arrives meanwhile (through Redis, any channel's events) waits
//! with it. A pipeline after a quiet spell, or whose channel had no pipeline just before,
//! and publications that arrive one by one, never wait for it. A pipeline that would not fit
//! in the batch is not added to it while no other is incomplete: the receive task delivers
//! what is held first ([`Batch::take`]), so pipelines are not cut where a batch fills up.
//! (They still are where a batch's [`RUN_WAIT`] ends, or at [`MAX_HELD`] when longer than
//! that or while another pipeline is incomplete: every wait is bounded.)
//!
//! Order is kept: events are delivered in arrival order, and whoever drives a batch flushes
//! it before anything it reports on its own (a gap after a reconnect). When the node stops, the
//! Redis task flushes what it holds; a NATS feed drops it, as the subscribers go too.

use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::local::Continuity;
use super::{BrokerEvents, ClientInfo};
use crate::types::Publication;

/// How long a held event may wait for more.
pub const WINDOW: Duration = Duration::from_millis(1);

/// How recent the previous event must be for a new one to be held at all; also how soon
/// after its channel's previous pipeline was complete a pipeline must start to be part of a
/// stream (which waits [`FOLLOW`] for the next).
pub const QUIET: Duration = Duration::from_millis(100);

/// How long a batch's first event may wait for the rest of announced pipelines
/// ([`Batch::arrived`]): a publisher sent them together, so they follow within milliseconds,
/// unless some were refused (published again one by one), the publisher failed, or (Redis) an
/// idempotent duplicate among them published nothing, so the announced last offset never
/// comes. Bounds the extra wait of those cases.
pub const RUN_WAIT: Duration = Duration::from_millis(20);

/// How long a batch whose announced pipelines have all arrived still waits for the next
/// pipeline, in a stream of pipelines (see the module docs). On the benchmark machine, with
/// the publisher's node busy writing to its subscribers, 1 ms merged almost no pipelines,
/// 2 ms some, 3 ms and 6 ms nearly all once the stream settled; 5 ms leaves a margin for a
/// busier publisher's node (in a debug build the next one often follows 3-5 ms later).
pub const FOLLOW: Duration = Duration::from_millis(5);

/// Events held at most: a full batch is delivered at once. As many as a publisher's pipeline
/// (`MESSAGES_PER_YIELD` in the session: the memory broker hands the node that many per read),
/// so a pipeline that arrives whole is delivered as one batch and a subscriber's writes stay
/// large without a long wait (docs/BENCHMARKS.md, "Issue 19: a batch laid end to end once").
pub const MAX_HELD: usize = 256;

/// One event waiting in a [`Batch`].
#[derive(Debug)]
enum Held {
    /// Consecutive publications of one channel and epoch: kept as one run as they arrive, so
    /// a held publication costs no copy of its channel and epoch.
    Run {
        channel: String,
        epoch: String,
        publications: Vec<Publication>,
    },
    Gap(String),
    Join(String, ClientInfo),
    Leave(String, ClientInfo),
}

/// What a receive task got and has not delivered yet; see the module docs.
#[derive(Debug)]
pub struct Batch {
    held: Vec<Held>,
    /// Events held (publications one by one), against [`MAX_HELD`].
    count: usize,
    /// When the previous event arrived.
    last: Option<Instant>,
    /// Fires when the held events are due; reset when the first one is held.
    timer: std::pin::Pin<Box<Sleep>>,
    /// When the held events are due without a longer wait ([`Batch::hold_until`]): the
    /// usual window after the first one.
    window_end: Instant,
    /// The channel, last offset and first arrival of each announced pipeline being waited
    /// for ([`Batch::expect_run`]); a few at most (one per channel).
    runs: Vec<(String, u64, Instant)>,
    /// Pipelines announced ahead of their first publication ([`Batch::announce`]): channel,
    /// count and the first one's offset; one per channel, at most [`MAX_ANNOUNCED`].
    announced: Vec<(String, u64, u64)>,
    /// When each channel's last pipeline was complete, for those within [`QUIET`]: a
    /// pipeline whose first publication arrived sooner than that after its channel's
    /// previous one was complete is part of a stream ([`Batch::run_complete`]). A pipeline
    /// cut short (the batch delivered before it was complete) records nothing.
    run_ended: Vec<(String, Instant)>,
    /// Whether a pipeline of a stream completed since the last delivery: the batch then
    /// waits [`FOLLOW`] for the next one ([`Batch::runs_arrived`]).
    follow: bool,
}

/// Announcements kept at most while their first publication has not arrived (it follows at
/// once, unless the connection dropped in between): the oldest goes first.
const MAX_ANNOUNCED: usize = 64;

impl Default for Batch {
    fn default() -> Self {
        Self {
            held: Vec::new(),
            count: 0,
            last: None,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            window_end: Instant::now(),
            runs: Vec::new(),
            announced: Vec::new(),
            run_ended: Vec::new(),
            follow: false,
        }
    }
}

impl Batch {
    /// Takes a received publication as the channel's continuity check classified it: the
    /// next one is held, one after a gap is held behind a gap report, one seen already or of
    /// a channel no longer wanted is dropped. `run` is how many publications it starts that
    /// its publisher sent together (1 if it says nothing, or as [`Batch::announce`]d): for
    /// more than one, the batch waits for the rest ([`RUN_WAIT`] at most). `true` if the
    /// batch must be flushed now.
    pub fn arrived(
        &mut self,
        channel: &str,
        epoch: &str,
        publication: Publication,
        continuity: Continuity,
        run: u64,
    ) -> bool {
        let offset = publication.offset;
        let run = run.max(self.announced_run(channel, offset));
        if !self.announced.is_empty() {
            // Its own announcement, or one whose publication never came: used or dropped.
            self.announced
                .retain(|(c, _, first)| c != channel || *first > offset);
        }
        let now = match continuity {
            Continuity::Next => self.publication(channel, epoch, publication),
            Continuity::Gap => {
                let quiet = self.gap(channel);
                self.publication(channel, epoch, publication) || quiet
            }
            Continuity::Seen | Continuity::Unwanted => return false,
        };
        if run > 1 {
            self.expect_run(channel, offset, run);
            return self.full();
        }
        now
    }

    /// Takes a received publication as [`Batch::arrived`] does, delivering what is held to
    /// `events` first if the publication starts a pipeline that would not fit in this batch
    /// ([`MAX_HELD`]) while no other pipeline is being waited for: the held events keep
    /// their pipelines whole, and the new one starts a batch of its own instead of being cut
    /// where this one fills up. (A pipeline is still cut where the batch's [`RUN_WAIT`] ends,
    /// or at [`MAX_HELD`] when it is longer or another is incomplete: the wait is bounded.)
    /// `true` if the batch must be delivered now.
    pub fn take(
        &mut self,
        events: &dyn BrokerEvents,
        channel: &str,
        epoch: &str,
        publication: Publication,
        continuity: Continuity,
        run: u64,
    ) -> bool {
        if self.flush_first(channel, publication.offset, continuity, run) {
            self.flush(events);
        }
        self.arrived(channel, epoch, publication, continuity, run)
    }

    /// See [`Batch::take`].
    fn flush_first(&self, channel: &str, offset: u64, continuity: Continuity, run: u64) -> bool {
        // A publication after a gap is held behind a gap report: one event more.
        let gap = match continuity {
            Continuity::Next => 0,
            Continuity::Gap => 1,
            Continuity::Seen | Continuity::Unwanted => return false,
        };
        if !self.holding() || !self.runs.is_empty() {
            return false;
        }
        let run = run.max(self.announced_run(channel, offset));
        run > 1 && (self.count as u64).saturating_add(gap + run) > MAX_HELD as u64
    }

    /// How many publications the pipeline [`Batch::announce`]d to start with `channel`'s
    /// publication at `offset` holds; 1 if none was.
    fn announced_run(&self, channel: &str, offset: u64) -> u64 {
        self.announced
            .iter()
            .find(|(c, _, first)| c == channel && *first == offset)
            .map_or(1, |(_, run, _)| *run)
    }

    /// Notes that the publication of `channel` at `offset` starts a pipeline of `run` (for a
    /// broker that announces pipelines with a message of their own right before that
    /// publication, as Redis does): when it arrives, it is taken as if [`Batch::arrived`] had
    /// been told so. Only that offset takes it, so another node's publication in between
    /// cannot; a later publication drops it. A later announcement of the channel replaces it.
    pub fn announce(&mut self, channel: &str, run: u64, offset: u64) {
        if let Some(at) = self.announced.iter().position(|(c, ..)| c == channel) {
            self.announced.remove(at);
        } else if self.announced.len() >= MAX_ANNOUNCED {
            self.announced.remove(0);
        }
        self.announced.push((channel.to_owned(), run, offset));
    }

    /// Holds a publication; `true` if the batch must be flushed now.
    fn publication(&mut self, channel: &str, epoch: &str, publication: Publication) -> bool {
        let now = self.note_arrival();
        if !self.runs.is_empty() {
            let offset = publication.offset;
            if let Some(at) = self
                .runs
                .iter()
                .position(|(c, end, _)| c == channel && offset >= *end)
            {
                let (_, _, started) = self.runs.swap_remove(at);
                self.run_complete(channel, started);
                if self.runs.is_empty() {
                    self.runs_arrived();
                }
            }
        }
        if let Some(Held::Run {
            channel: run_channel,
            epoch: run_epoch,
            publications,
        }) = self.held.last_mut()
            && run_channel == channel
            && run_epoch == epoch
        {
            publications.push(publication);
            self.count += 1;
            return now || self.full();
        }
        self.push(
            Held::Run {
                channel: channel.to_owned(),
                epoch: epoch.to_owned(),
                publications: vec![publication],
            },
            now,
        )
    }

    /// Holds a gap report (in order with the publications around it); `true` if the batch
    /// must be flushed now.
    fn gap(&mut self, channel: &str) -> bool {
        self.hold(Held::Gap(channel.to_owned()))
    }

    /// Holds a join; `true` if the batch must be flushed now.
    pub fn join(&mut self, channel: &str, client: ClientInfo) -> bool {
        self.hold(Held::Join(channel.to_owned(), client))
    }

    /// Holds a leave; `true` if the batch must be flushed now.
    pub fn leave(&mut self, channel: &str, client: ClientInfo) -> bool {
        self.hold(Held::Leave(channel.to_owned(), client))
    }

    fn hold(&mut self, event: Held) -> bool {
        let now = self.note_arrival();
        self.push(event, now)
    }

    /// Notes an arrival; `true` if it follows a quiet spell (to be delivered at once).
    fn note_arrival(&mut self) -> bool {
        let now = Instant::now();
        let streaming = self.last.is_some_and(|last| now - last < QUIET);
        self.last = Some(now);
        if self.held.is_empty() {
            self.window_end = now + WINDOW;
            self.timer.as_mut().reset(self.window_end);
        }
        !streaming
    }

    fn push(&mut self, event: Held, now: bool) -> bool {
        self.held.push(event);
        self.count += 1;
        now || self.full()
    }

    /// Whether the batch holds [`MAX_HELD`] events: it must be delivered now.
    pub fn full(&self) -> bool {
        self.count >= MAX_HELD
    }

    /// Keeps what is held until at least `until` (unless it fills up first): for announced
    /// pipelines ([`Batch::expect_run`]), until their last offsets have arrived
    /// ([`Batch::runs_arrived`]).
    fn hold_until(&mut self, until: Instant) {
        if self.holding() && self.timer.deadline() < until {
            self.timer.as_mut().reset(until);
        }
    }

    /// Says that the publication of `channel` just held at `offset` starts a pipeline of `run`
    /// (its publisher sent them together): what is held waits for the pipeline's last offset,
    /// even if it arrived after a quiet spell, and is then due as [`Batch::runs_arrived`]
    /// says. The caller delivers the batch only if it is full. Several channels' pipelines
    /// may be waited for at once (one receive task serves every channel of a Redis node); the
    /// batch waits for all of them, at most [`RUN_WAIT`] after its first event, or until
    /// [`MAX_HELD`].
    fn expect_run(&mut self, channel: &str, offset: u64, run: u64) {
        if run <= 1 {
            return;
        }
        let end = offset.saturating_add(run - 1);
        match self.runs.iter_mut().find(|(c, ..)| c == channel) {
            Some(pending) => pending.1 = end,
            None => self.runs.push((channel.to_owned(), end, Instant::now())),
        }
        self.hold_until(self.first() + RUN_WAIT);
    }

    /// A pipeline of `channel` whose first publication arrived at `started` is complete: it
    /// is part of a stream if its channel's previous one was complete less than [`QUIET`]
    /// before that. A publisher sending in bulk sends the next pipeline as soon as the
    /// previous one is answered, but its own node may first spend 10-20 ms writing the
    /// previous batch to its subscribers, and the generator of the benchmark sends more only
    /// once it received that: [`RUN_WAIT`] as the limit missed every other pipeline there.
    fn run_complete(&mut self, channel: &str, started: Instant) {
        let now = Instant::now();
        self.follow |= self
            .run_ended
            .iter()
            .any(|(c, ended)| c == channel && started.saturating_duration_since(*ended) < QUIET);
        self.run_ended
            .retain(|(c, ended)| c != channel && now - *ended < QUIET);
        if self.run_ended.len() >= MAX_ANNOUNCED {
            self.run_ended.remove(0);
        }
        self.run_ended.push((channel.to_owned(), now));
    }

    /// The pipelines waited for have all arrived ([`Batch::expect_run`]). If one of them was
    /// part of a stream ([`Batch::run_complete`]), what is held is due [`FOLLOW`] from now,
    /// for the next pipeline (one announced meanwhile is waited for too), unless that would
    /// pass [`RUN_WAIT`] after the first event (a pipeline starting that late would be cut
    /// there). Otherwise it is due when it would have been without the longer wait: at the
    /// end of the usual window, at once if that has passed. Later events still join it until
    /// then.
    fn runs_arrived(&mut self) {
        let follow = std::mem::take(&mut self.follow);
        if self.holding() {
            let next = Instant::now() + FOLLOW;
            let due = if follow && next <= self.first() + RUN_WAIT {
                next
            } else {
                self.window_end
            };
            self.timer.as_mut().reset(due);
        }
    }

    /// When the first held event arrived.
    fn first(&self) -> Instant {
        self.window_end - WINDOW
    }

    /// Whether events are waiting (the timer branch of the receive loop is live only then).
    pub fn holding(&self) -> bool {
        self.count > 0
    }

    /// Completes when the held events are due (use only while [`Batch::holding`]).
    pub fn due(&mut self) -> &mut std::pin::Pin<Box<Sleep>> {
        &mut self.timer
    }

    /// Delivers everything held, in arrival order, in one go: no subscriber runs in between,
    /// so each is woken once for all of it. Consecutive publications of one channel and
    /// epoch go over together ([`BrokerEvents::on_publications`]).
    pub fn flush(&mut self, events: &dyn BrokerEvents) {
        for held in self.held.drain(..) {
            match held {
                Held::Run {
                    channel,
                    epoch,
                    publications,
                } => events.on_publications(&channel, &epoch, &publications),
                Held::Gap(channel) => events.on_gap(&channel),
                Held::Join(channel, client) => events.on_join(&channel, &client),
                Held::Leave(channel, client) => events.on_leave(&channel, &client),
            }
        }
        // Announcements stay: their publications may still be on their way.
        self.count = 0;
        self.runs.clear();
        self.follow = false;
    }

    /// Drops what is held (the feed stopped: nobody wants it any more). A pipeline not
    /// complete by then is no longer waited for.
    pub fn discard(&mut self) {
        self.held.clear();
        self.count = 0;
        self.runs.clear();
        self.announced.clear();
        self.follow = false;
    }
}

#[cfg(test)]
#[path = "batch_tests.rs"]
mod tests;
