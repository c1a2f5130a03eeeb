//! Tests of [`super::Batch`], with the runtime's clock paused.

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

    // What was waited for came early: due at the end of the usual window, ...
    let waited = Instant::now();
    assert!(!batch.publication("c", "e", publication(5)));
    batch.hold_until(Instant::now() + Duration::from_millis(20));
    batch.runs_arrived();
    batch.due().await;
    assert_eq!(waited.elapsed(), WINDOW);
    batch.flush(&node);
    // ... or late: due at once.
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
    assert!(
        !batch.take(&node, "c", "e", publication(5), Continuity::Next, 3),
        "it fits: it joins"
    );
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
    // It stops waiting for more once FOLLOW would pass RUN_WAIT.
    assert!(waited.elapsed() <= RUN_WAIT, "{:?}", waited.elapsed());
    assert!(
        waited.elapsed() > RUN_WAIT - FOLLOW,
        "{:?}",
        waited.elapsed()
    );

    // A pipeline more than QUIET after its channel's previous one is not a stream.
    batch.flush(&node);
    tokio::time::advance(QUIET).await;
    assert!(!batch.arrived("c", "e", publication(offset), Continuity::Next, 2));
    assert!(!batch.arrived("c", "e", publication(offset + 1), Continuity::Next, 1));
    let waited = Instant::now();
    batch.due().await;
    assert_eq!(waited.elapsed(), WINDOW, "due at the window's end");
    // Nor is one of another channel.
    batch.flush(&node);
    assert!(!batch.arrived("d", "e", publication(1), Continuity::Next, 2));
    assert!(!batch.arrived("d", "e", publication(2), Continuity::Next, 1));
    let waited = Instant::now();
    batch.due().await;
    assert_eq!(waited.elapsed(), WINDOW, "due at the window's end");
}

#[tokio::test(start_paused = true)]
async fn a_pipeline_that_would_be_cut_starts_a_batch_of_its_own() {
    let mut batch = Batch::default();
    let node = Recorder::default();
    let held_200 = |batch: &mut Batch, first: u64| {
        assert!(!batch.take(&node, "c", "e", publication(first), Continuity::Next, 200));
        for offset in first + 1..first + 200 {
            assert!(!batch.take(&node, "c", "e", publication(offset), Continuity::Next, 1));
        }
    };
    held_200(&mut batch, 1);
    // A pipeline of 100 would be cut at MAX_HELD: what is held goes first.
    assert!(!batch.take(&node, "c", "e", publication(201), Continuity::Next, 100));
    assert_eq!(node.runs("c"), [200], "delivered before the next pipeline");
    for offset in 202..=300 {
        assert!(!batch.take(&node, "c", "e", publication(offset), Continuity::Next, 1));
    }
    batch.flush(&node);
    assert_eq!(node.runs("c"), [200, 100], "both whole");

    // One of 56 fits (256), unless a gap report is held with it; announced ahead (Redis)
    // counts as well; a publication seen already or not wanted is not held at all.
    held_200(&mut batch, 301);
    assert!(!batch.flush_first("c", 501, Continuity::Next, 56));
    assert!(batch.flush_first("c", 501, Continuity::Gap, 56));
    assert!(!batch.flush_first("c", 501, Continuity::Seen, 100));
    assert!(!batch.flush_first("c", 501, Continuity::Unwanted, 100));
    assert!(
        !batch.flush_first("c", 501, Continuity::Next, 1),
        "no pipeline"
    );
    batch.announce("c", 100, 501);
    assert!(batch.flush_first("c", 501, Continuity::Next, 1));
    assert!(
        !batch.flush_first("c", 502, Continuity::Next, 1),
        "not its offset"
    );
    batch.discard();

    // Not while another pipeline is incomplete: delivering now would cut that one.
    assert!(!batch.arrived("d", "e", publication(1), Continuity::Next, 300));
    for offset in 2..=200 {
        assert!(!batch.arrived("d", "e", publication(offset), Continuity::Next, 1));
    }
    assert!(!batch.flush_first("c", 501, Continuity::Next, 100));
    batch.discard();
    assert!(
        !batch.flush_first("c", 501, Continuity::Next, 100),
        "nothing held"
    );
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
