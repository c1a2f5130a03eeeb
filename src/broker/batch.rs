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
//! In a stream of pipelines (one completes less than [`QUIET`] after the previous one), the
//! batch still waits [`FOLLOW`] for the next pipeline once those it waits for have all
//! arrived (never past [`RUN_WAIT`] after its first event). A publisher that sends in bulk
//! sends its next pipeline as soon as the previous one is answered, which is when that one's
//! last publication reaches the nodes. Delivered without that wait, a stream of pipelines
//! reaches each subscriber as one write per pipeline, and pipelines are short: the
//! publisher's messages are split between the one the broker runs and the one the node writes
//! out. Waiting for the next one doubles what each write carries (measured, 1,000
//! subscribers: 6.2-7.1 `writev` per 1,000 deliveries without it, about 4.0 with it, the
//! memory broker's 4.0; docs/BENCHMARKS.md, "Issue 19: the next pipeline waited for"). The
//! cost: in such a stream, each batch is delivered up to [`FOLLOW`] after its last pipeline
//! arrived, and whatever else arrives meanwhile (through Redis, any channel's events) waits
//! with it. A pipeline after a quiet spell, and publications that arrive one by one, never
//! wait for it. A pipeline that would not fit in the batch is not added to it: the receive
//! task delivers what is held first ([`Batch::flush_first`]), so pipelines stay whole (a
//! stream that takes longer than [`RUN_WAIT`] is still cut there).
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

/// How recent the previous event must be for a new one to be held at all.
pub const QUIET: Duration = Duration::from_millis(100);

/// How long a batch's first event may wait for the rest of announced pipelines
/// ([`Batch::arrived`]): a publisher sent them together, so they follow within milliseconds,
/// unless some were refused (published again one by one), the publisher failed, or (Redis) an
/// idempotent duplicate among them published nothing, so the announced last offset never
/// comes. Bounds the extra wait of those cases.
pub const RUN_WAIT: Duration = Duration::from_millis(20);

/// How long a batch whose announced pipelines have all arrived still waits for the next
/// pipeline of their publisher (see the module docs). On the benchmark machine, with the
/// publisher's node busy writing to its subscribers, 1 ms merged almost no pipelines, 2 ms
/// some, 3 ms and 6 ms nearly all once the stream settled; 5 ms leaves a margin for a
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
    /// The channel and last offset of each announced pipeline being waited for
    /// ([`Batch::expect_run`]); a few at most (one per channel).
    runs: Vec<(String, u64)>,
    /// Pipelines announced ahead of their first publication ([`Batch::announce`]): channel,
    /// count and the first one's offset; one per channel, at most [`MAX_ANNOUNCED`].
    announced: Vec<(String, u64, u64)>,
    /// When the pipelines waited for last all arrived: one that completes less than
    /// [`QUIET`] after the previous one is part of a stream, and waits [`FOLLOW`] for the next.
    run_ended: Option<Instant>,
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
            run_ended: None,
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
        mut run: u64,
    ) -> bool {
        let offset = publication.offset;
        if !self.announced.is_empty()
            && let Some(at) = self.announced.iter().position(|(c, ..)| c == channel)
            && self.announced[at].2 <= offset
        {
            // Its own announcement, or one whose publication never came: used or dropped.
            let (_, announced, first) = self.announced.remove(at);
            if first == offset {
                run = run.max(announced);
            }
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

    /// Whether what is held must be delivered before the publication of `channel` at `offset`
    /// is taken ([`Batch::arrived`], with the same `run`): when it starts a pipeline that
    /// would not fit in this batch ([`MAX_HELD`]). Delivered first, the held events keep
    /// their pipelines whole, and the new one starts a batch of its own, instead of being cut
    /// where this one fills up. (One that does not complete within the batch's [`RUN_WAIT`]
    /// is still cut there: the wait is bounded.)
    pub fn flush_first(&self, channel: &str, offset: u64, run: u64) -> bool {
        if !self.holding() {
            return false;
        }
        let announced = self
            .announced
            .iter()
            .find(|(c, _, first)| c == channel && *first == offset)
            .map_or(1, |(_, announced, _)| *announced);
        let run = run.max(announced);
        run > 1 && (self.count as u64).saturating_add(run) > MAX_HELD as u64
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
            self.runs.retain(|(c, end)| c != channel || offset < *end);
            if self.runs.is_empty() {
                self.runs_arrived();
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
    /// says. The caller delivers the batch only if it is full. Several channels' pipelines may be waited for at once
    /// (one receive task serves every channel of a Redis node); the batch waits for all of
    /// them, at most [`RUN_WAIT`] after its first event, or until [`MAX_HELD`].
    fn expect_run(&mut self, channel: &str, offset: u64, run: u64) {
        if run <= 1 {
            return;
        }
        let end = offset.saturating_add(run - 1);
        match self.runs.iter_mut().find(|(c, _)| c == channel) {
            Some(pending) => pending.1 = end,
            None => self.runs.push((channel.to_owned(), end)),
        }
        self.hold_until(self.first() + RUN_WAIT);
    }

    /// The pipelines waited for have all arrived ([`Batch::expect_run`]). If the previous
    /// ones did so less than [`QUIET`] ago (a stream of pipelines), what is held is due
    /// [`FOLLOW`] from now, for the next pipeline (one announced meanwhile is waited for too),
    /// but no later than [`RUN_WAIT`] after the first event. Otherwise it is due when it would
    /// have been without the longer wait: at the end of the usual window, at once if that has
    /// passed. Later events still join it until then.
    fn runs_arrived(&mut self) {
        let now = Instant::now();
        let streaming = self.run_ended.is_some_and(|ended| now - ended < QUIET);
        self.run_ended = Some(now);
        if self.holding() {
            let due = if streaming {
                (now + FOLLOW).min(self.first() + RUN_WAIT)
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
    }

    /// Drops what is held (the feed stopped: nobody wants it any more). A pipeline not
    /// complete by then is no longer waited for.
    pub fn discard(&mut self) {
        self.held.clear();
        self.count = 0;
        self.runs.clear();
        self.announced.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::conformance::{Event, Recorder, json};

    fn publication(offset: u64) -> Publication {
        Publication {
            offset,
            data: json("1"),
            client_id: None,
        }
    }

    /// Whether the batch is not due yet (its timer has not fired).
    async fn not_due(batch: &mut Batch) -> bool {
        tokio::time::timeout(Duration::ZERO, batch.due())
            .await
            .is_err()
    }

    fn client() -> ClientInfo {
        ClientInfo {
            client_id: uuid::Uuid::new_v4(),
            user: None,
            info: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_event_after_a_quiet_spell_goes_at_once_and_a_stream_waits_for_more() {
        let mut batch = Batch::default();
        let node = Recorder::default();
        assert!(
            batch.publication("c", "e", publication(1)),
            "quiet: at once"
        );
        batch.flush(&node);
        let (joined, left) = (client(), client());
        assert!(
            !batch.publication("c", "e", publication(2)),
            "streaming: held"
        );
        assert!(!batch.gap("c"));
        assert!(!batch.publication("c", "e", publication(4)));
        assert!(!batch.join("c", joined.clone()));
        assert!(!batch.leave("c", left.clone()));
        assert!(batch.holding());
        assert_eq!(node.taken("").len(), 1, "nothing delivered early");
        let waited = Instant::now();
        batch.due().await;
        assert_eq!(
            waited.elapsed(),
            WINDOW,
            "due one window after the first held"
        );
        batch.flush(&node);
        assert!(!batch.holding());
        assert_eq!(
            node.taken(""),
            [
                Event::Publication("c".into(), 1),
                Event::Publication("c".into(), 2),
                Event::Gap("c".into()),
                Event::Publication("c".into(), 4),
                Event::Join("c".into(), joined.client_id),
                Event::Leave("c".into(), left.client_id),
            ],
            "delivered in arrival order"
        );
        assert_eq!(node.epochs("c").len(), 3);
        tokio::time::advance(QUIET - WINDOW - Duration::from_millis(1)).await;
        assert!(
            !batch.publication("c", "e", publication(5)),
            "still streaming"
        );
        batch.flush(&node);
        tokio::time::advance(QUIET).await;
        assert!(batch.publication("c", "e", publication(6)), "quiet again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_is_delivered_at_once() {
        let mut batch = Batch::default();
        assert!(batch.publication("c", "e", publication(1)));
        batch.discard();
        for offset in 2..=MAX_HELD as u64 {
            assert!(!batch.publication("c", "e", publication(offset)));
        }
        assert!(batch.publication("c", "e", publication(MAX_HELD as u64 + 1)));
        let node = Recorder::default();
        batch.flush(&node);
        assert_eq!(node.taken("c").len(), MAX_HELD);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_told_more_is_coming_waits_longer_and_only_then() {
        let mut batch = Batch::default();
        batch.hold_until(Instant::now() + Duration::from_millis(20));
        assert!(!batch.holding(), "nothing held: nothing to wait for");
        assert!(batch.publication("c", "e", publication(1)));
        batch.discard();
        assert!(!batch.publication("c", "e", publication(2)));
        let waited = Instant::now();
        batch.hold_until(Instant::now() + Duration::from_millis(20));
        batch.hold_until(Instant::now() + Duration::from_millis(5));
        assert!(!batch.publication("c", "e", publication(3)));
        batch.due().await;
        assert_eq!(
            waited.elapsed(),
            Duration::from_millis(20),
            "the longest wait asked for"
        );
        let node = Recorder::default();
        batch.flush(&node);
        assert_eq!(node.runs("c"), [2]);
        let waited = Instant::now();
        assert!(!batch.publication("c", "e", publication(4)));
        batch.due().await;
        assert_eq!(waited.elapsed(), WINDOW, "the next batch waits as usual");
        batch.flush(&node);

        // What was waited for came early: due at the end of the usual window ...
        let waited = Instant::now();
        assert!(!batch.publication("c", "e", publication(5)));
        batch.hold_until(Instant::now() + Duration::from_millis(20));
        batch.runs_arrived();
        batch.due().await;
        assert_eq!(waited.elapsed(), WINDOW);
        batch.flush(&node);
        // ... or late: due at once, ...
        tokio::time::advance(QUIET).await;
        assert!(
            batch.publication("c", "e", publication(6)),
            "quiet: at once"
        );
        batch.flush(&node);
        assert!(!batch.publication("c", "e", publication(7)));
        batch.hold_until(Instant::now() + Duration::from_millis(20));
        tokio::time::advance(WINDOW * 3).await;
        let waited = Instant::now();
        batch.runs_arrived();
        batch.due().await;
        assert_eq!(waited.elapsed(), Duration::ZERO);
        batch.flush(&node);
        // ... unless the previous one came less than QUIET before (a stream of pipelines):
        // then FOLLOW later, for the next one, but never past RUN_WAIT after the first event.
        assert!(!batch.publication("c", "e", publication(8)));
        let first = Instant::now();
        batch.hold_until(Instant::now() + Duration::from_millis(20));
        batch.runs_arrived();
        batch.due().await;
        assert_eq!(first.elapsed(), FOLLOW);
        batch.flush(&node);
        assert!(!batch.publication("c", "e", publication(9)));
        let first = Instant::now();
        batch.hold_until(Instant::now() + Duration::from_millis(20));
        tokio::time::advance(RUN_WAIT - WINDOW).await;
        batch.runs_arrived();
        batch.due().await;
        assert_eq!(first.elapsed(), RUN_WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn an_announced_pipeline_waits_for_its_last_offset_even_after_a_quiet_spell() {
        let mut batch = Batch::default();
        let node = Recorder::default();
        assert!(
            !batch.arrived("c", "e", publication(1), Continuity::Next, 3),
            "quiet, but announced: held"
        );
        assert!(!batch.arrived("c", "e", publication(2), Continuity::Next, 1));
        assert!(!batch.arrived("d", "e", publication(1), Continuity::Next, 1));
        let waited = Instant::now();
        tokio::time::advance(WINDOW * 5).await;
        assert!(
            not_due(&mut batch).await,
            "not due before the last offset, though the window passed"
        );
        assert!(!batch.arrived("c", "e", publication(3), Continuity::Next, 1));
        batch.due().await;
        assert_eq!(
            waited.elapsed(),
            WINDOW * 5,
            "due at once: the window passed"
        );
        batch.flush(&node);
        assert_eq!(node.runs("c"), [2, 1], "the pipeline in one batch");

        // A pipeline whose rest never comes is waited for RUN_WAIT at most; a duplicate or an
        // unwanted publication is not held; a gap is reported before its publication.
        let waited = Instant::now();
        assert!(!batch.arrived("c", "e", publication(10), Continuity::Gap, 5));
        assert!(!batch.arrived("c", "e", publication(10), Continuity::Seen, 1));
        assert!(!batch.arrived("x", "e", publication(1), Continuity::Unwanted, 1));
        batch.due().await;
        assert_eq!(waited.elapsed(), RUN_WAIT);
        batch.flush(&node);
        assert_eq!(
            node.taken("").into_iter().skip(4).collect::<Vec<_>>(),
            [Event::Gap("c".into()), Event::Publication("c".into(), 10)]
        );
        assert!(!batch.holding());

        // A full batch goes at once, announced or not.
        assert!(!batch.arrived("c", "e", publication(11), Continuity::Next, 1000));
        for offset in 12..11 + MAX_HELD as u64 - 1 {
            assert!(!batch.arrived("c", "e", publication(offset), Continuity::Next, 1));
        }
        assert!(batch.arrived(
            "c",
            "e",
            publication(10 + MAX_HELD as u64),
            Continuity::Next,
            1
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn pipelines_of_several_channels_are_all_waited_for_and_run_wait_bounds_the_first() {
        let mut batch = Batch::default();
        let node = Recorder::default();
        let waited = Instant::now();
        assert!(!batch.arrived("a", "e", publication(1), Continuity::Next, 3));
        assert!(!batch.arrived("b", "e", publication(1), Continuity::Next, 2));
        assert!(!batch.arrived("b", "e", publication(2), Continuity::Next, 1));
        tokio::time::advance(WINDOW * 5).await;
        assert!(
            not_due(&mut batch).await,
            "b is complete, a is not: still waiting"
        );
        assert!(!batch.arrived("a", "e", publication(2), Continuity::Next, 1));
        assert!(!batch.arrived("a", "e", publication(3), Continuity::Next, 1));
        batch.due().await;
        assert_eq!(waited.elapsed(), WINDOW * 5, "both complete: due at once");
        batch.flush(&node);
        assert_eq!((node.runs("a"), node.runs("b")), (vec![1, 2], vec![2]));

        // Announcements that keep coming and never complete: the first event waits RUN_WAIT.
        let waited = Instant::now();
        for offset in 4..10 {
            assert!(!batch.arrived("a", "e", publication(offset), Continuity::Next, 100));
            tokio::time::advance(RUN_WAIT / 8).await;
        }
        batch.due().await;
        assert_eq!(waited.elapsed(), RUN_WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn in_a_stream_of_pipelines_a_complete_one_waits_for_the_next() {
        let mut batch = Batch::default();
        let node = Recorder::default();
        // A pipeline after a quiet spell: due as soon as it is complete.
        assert!(!batch.arrived("c", "e", publication(1), Continuity::Next, 2));
        tokio::time::advance(WINDOW * 2).await;
        assert!(!batch.arrived("c", "e", publication(2), Continuity::Next, 1));
        let waited = Instant::now();
        batch.due().await;
        assert_eq!(waited.elapsed(), Duration::ZERO, "alone: at once");
        batch.flush(&node);
        // The next one, complete less than QUIET later, waits for a third, ...
        let waited = Instant::now();
        assert!(!batch.arrived("c", "e", publication(3), Continuity::Next, 2));
        tokio::time::advance(WINDOW * 2).await;
        assert!(!batch.arrived("c", "e", publication(4), Continuity::Next, 1));
        tokio::time::advance(FOLLOW - WINDOW).await;
        assert!(
            not_due(&mut batch).await,
            "complete, but the next pipeline may follow"
        );
        assert!(!batch.flush_first("c", 5, 3), "it fits: it joins");
        assert!(!batch.arrived("c", "e", publication(5), Continuity::Next, 3));
        tokio::time::advance(FOLLOW).await;
        assert!(
            not_due(&mut batch).await,
            "the next pipeline is not complete yet"
        );
        assert!(!batch.arrived("c", "e", publication(6), Continuity::Next, 1));
        assert!(!batch.arrived("c", "e", publication(7), Continuity::Next, 1));
        // ... and when none follows within FOLLOW, both go as one batch.
        batch.due().await;
        assert_eq!(waited.elapsed(), WINDOW + FOLLOW * 3);
        assert!(waited.elapsed() < RUN_WAIT, "not cut short by RUN_WAIT");
        batch.flush(&node);
        assert_eq!(node.runs("c"), [2, 5], "the last two pipelines, one wake");

        // A chain of pipelines is delivered RUN_WAIT after its first event at the latest.
        let waited = Instant::now();
        let mut offset = 8;
        while waited.elapsed() < RUN_WAIT * 2 {
            assert!(!batch.arrived("c", "e", publication(offset), Continuity::Next, 2));
            assert!(!batch.arrived("c", "e", publication(offset + 1), Continuity::Next, 1));
            offset += 2;
            if tokio::time::timeout(FOLLOW / 2, batch.due()).await.is_ok() {
                break;
            }
        }
        assert!(waited.elapsed() <= RUN_WAIT, "{:?}", waited.elapsed());
        assert!(
            waited.elapsed() >= RUN_WAIT - FOLLOW / 2,
            "{:?}",
            waited.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pipeline_that_would_be_cut_starts_a_batch_of_its_own() {
        let mut batch = Batch::default();
        let node = Recorder::default();
        assert!(!batch.flush_first("c", 1, 200), "nothing held");
        assert!(!batch.arrived("c", "e", publication(1), Continuity::Next, 200));
        for offset in 2..=200 {
            assert!(!batch.arrived("c", "e", publication(offset), Continuity::Next, 1));
        }
        // 200 held: a pipeline of 100 would be cut at MAX_HELD, one of 50 fits, and a single
        // publication is no pipeline.
        assert!(batch.flush_first("c", 201, 100));
        assert!(!batch.flush_first("c", 201, 50));
        assert!(!batch.flush_first("c", 201, 1));
        batch.announce("c", 100, 201);
        assert!(batch.flush_first("c", 201, 1), "announced ahead (Redis)");
        assert!(!batch.flush_first("c", 202, 1), "not its first offset");
        batch.flush(&node);
        assert_eq!(node.runs("c"), [200]);
        assert!(!batch.flush_first("c", 201, 100), "nothing held");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pipeline_announced_ahead_is_waited_for_from_its_first_publication() {
        let mut batch = Batch::default();
        let node = Recorder::default();
        batch.announce("c", 2, 1);
        batch.announce("d", 5, 1);
        // A flush in between (another channel's batch) keeps the announcements.
        assert!(batch.arrived("x", "e", publication(1), Continuity::Next, 1));
        batch.flush(&node);
        tokio::time::advance(QUIET * 2).await;
        let waited = Instant::now();
        assert!(
            !batch.arrived("c", "e", publication(1), Continuity::Next, 1),
            "quiet, but announced: held"
        );
        tokio::time::advance(WINDOW * 3).await;
        assert!(!batch.arrived("c", "e", publication(2), Continuity::Next, 1));
        batch.due().await;
        assert_eq!(waited.elapsed(), WINDOW * 3, "complete: due at once");
        batch.flush(&node);
        assert_eq!(node.runs("c"), [2]);
        // Used once: the channel's next publication after a quiet spell goes at once.
        tokio::time::advance(QUIET * 2).await;
        assert!(batch.arrived("c", "e", publication(3), Continuity::Next, 1));
        batch.flush(&node);
        // Only the announced offset takes it: an earlier one (another node's publication in
        // between) does not, and a later one drops it (its publication never came).
        batch.announce("c", 2, 5);
        tokio::time::advance(QUIET * 2).await;
        assert!(batch.arrived("c", "e", publication(4), Continuity::Next, 1));
        batch.flush(&node);
        tokio::time::advance(QUIET * 2).await;
        assert!(!batch.arrived("c", "e", publication(5), Continuity::Next, 1));
        batch.discard();
        batch.announce("c", 2, 7);
        tokio::time::advance(QUIET * 2).await;
        assert!(batch.arrived("c", "e", publication(8), Continuity::Next, 1));
        assert!(!batch.announced.iter().any(|(c, ..)| c == "c"), "dropped");
        batch.flush(&node);
        // A later announcement replaces one that brought nothing; only so many are kept.
        batch.announce("d", 2, 1);
        for n in 0..MAX_ANNOUNCED {
            batch.announce(&format!("other{n}"), 2, 1);
        }
        tokio::time::advance(QUIET * 2).await;
        assert!(
            batch.arrived("d", "e", publication(1), Continuity::Next, 1),
            "the oldest announcement was dropped"
        );
        assert!(batch.announced.len() <= MAX_ANNOUNCED);
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_publications_of_one_channel_and_epoch_go_over_together() {
        let mut batch = Batch::default();
        batch.publication("a", "e1", publication(1));
        batch.discard();
        for (channel, epoch, offset) in [
            ("a", "e1", 2),
            ("a", "e1", 3),
            ("b", "e1", 1),
            ("a", "e1", 4),
            ("a", "e2", 1),
            ("a", "e2", 2),
        ] {
            batch.publication(channel, epoch, publication(offset));
        }
        batch.gap("a");
        batch.publication("a", "e2", publication(3));
        batch.join("b", client());
        batch.publication("a", "e2", publication(4));
        let node = Recorder::default();
        batch.flush(&node);
        assert_eq!(
            node.runs("a"),
            [2, 1, 2, 1, 1],
            "runs of one channel and epoch"
        );
        assert_eq!(node.runs("b"), [1]);
        assert_eq!(
            node.epochs("a"),
            [
                (2, "e1"),
                (3, "e1"),
                (4, "e1"),
                (1, "e2"),
                (2, "e2"),
                (3, "e2"),
                (4, "e2")
            ]
            .map(|(o, e)| (o, e.to_owned()))
        );
        let order: Vec<Event> = node.taken("").into_iter().skip(6).collect();
        assert!(
            matches!(
                &order[..],
                [
                    Event::Gap(_),
                    Event::Publication(_, 3),
                    Event::Join(..),
                    Event::Publication(_, 4)
                ]
            ),
            "gaps and joins keep their place: {order:?}"
        );
    }
}
