//! What the broker delivers, rendered into frames for the local hub.

use std::sync::Arc;

use bytes::Bytes;

use super::{CONTROL_CHANNEL, DEFAULT_CHANNEL};
use crate::broker::BrokerEvents;
use crate::engine::control::Control;
use crate::engine::hub::{Hub, Outgoing, epoch_tag};
use crate::engine::sessions::Sessions;
use crate::engine::stats::Stats;
use crate::protocol::legacy::ServerFrame;
use crate::protocol::v1::Frame;
use crate::types::{ClientInfo, Publication};
use crate::ws::frame::{OpCode, encode};

/// Renders broker deliveries into frames for the local hub.
#[derive(Debug)]
pub struct Dispatcher {
    hub: Arc<Hub>,
    echo_to_sender: bool,
    stats: Arc<Stats>,
    control: Arc<Control>,
}

impl Dispatcher {
    /// A dispatcher feeding `hub`, counting gaps in `stats`, acting on control messages for
    /// `sessions`.
    pub fn new(
        hub: Arc<Hub>,
        echo_to_sender: bool,
        stats: Arc<Stats>,
        sessions: Arc<Sessions>,
    ) -> Self {
        Self {
            hub,
            echo_to_sender,
            stats,
            control: Arc::new(Control::new(sessions)),
        }
    }

    /// The control side, for [`super::Node::start`]: recovering missed control messages needs the
    /// broker, which is built after (and around) the dispatcher.
    pub fn control(&self) -> Arc<Control> {
        Arc::clone(&self.control)
    }
}

fn text_frame(json: &str) -> Bytes {
    encode(OpCode::Text, json.as_bytes())
}

/// The v1 `publication` frame of a publication on `channel`.
fn publication_frame(channel: &str, epoch: &str, publication: &Publication) -> Bytes {
    text_frame(
        &Frame::Publication {
            channel,
            offset: publication.offset,
            epoch,
            data: &publication.data,
            client_id: publication.client_id,
        }
        .to_json(),
    )
}

impl BrokerEvents for Dispatcher {
    fn on_publication(&self, channel: &str, epoch: &str, publication: &Publication) {
        if channel == CONTROL_CHANNEL {
            return self.control.on_publication(epoch, publication);
        }
        let place = Some((epoch_tag(epoch), publication.offset));
        if channel == DEFAULT_CHANNEL {
            // Legacy chat: the stored data *is* the legacy Chat frame; the sender gets no copy.
            let frame = text_frame(publication.data.get());
            let skip = publication.client_id.filter(|_| !self.echo_to_sender);
            let delivery = self.hub.deliver(channel, place, &frame, skip);
            self.stats.notices_dropped(delivery.notices_dropped);
            return;
        }
        let frame = publication_frame(channel, epoch, publication);
        let delivery = self.hub.deliver(channel, place, &frame, None);
        self.stats.notices_dropped(delivery.notices_dropped);
    }

    fn on_publications(&self, channel: &str, epoch: &str, publications: &[Publication]) {
        if channel == CONTROL_CHANNEL || publications.len() == 1 {
            for publication in publications {
                self.on_publication(channel, epoch, publication);
            }
            return;
        }
        let tag = epoch_tag(epoch);
        let batch: Vec<Outgoing> = publications
            .iter()
            .map(|publication| {
                if channel == DEFAULT_CHANNEL {
                    Outgoing {
                        place: (tag, publication.offset),
                        frame: text_frame(publication.data.get()),
                        skip: publication.client_id.filter(|_| !self.echo_to_sender),
                    }
                } else {
                    Outgoing {
                        place: (tag, publication.offset),
                        frame: publication_frame(channel, epoch, publication),
                        skip: None,
                    }
                }
            })
            .collect();
        let delivery = self.hub.deliver_batch(channel, &batch);
        self.stats.notices_dropped(delivery.notices_dropped);
    }

    fn on_join(&self, channel: &str, client: &ClientInfo) {
        if channel == DEFAULT_CHANNEL {
            return; // The legacy dialect has no join notice.
        }
        let frame = text_frame(&Frame::Join { channel, client }.to_json());
        let delivery = self
            .hub
            .deliver(channel, None, &frame, Some(client.client_id));
        self.stats.notices_dropped(delivery.notices_dropped);
    }

    fn on_leave(&self, channel: &str, client: &ClientInfo) {
        let json = if channel == DEFAULT_CHANNEL {
            ServerFrame::Disconnect {
                client_id: client.client_id,
            }
            .to_json()
        } else {
            Frame::Leave { channel, client }.to_json()
        };
        let delivery = self
            .hub
            .deliver(channel, None, &text_frame(&json), Some(client.client_id));
        self.stats.notices_dropped(delivery.notices_dropped);
    }

    fn on_gap(&self, channel: &str) {
        if channel == CONTROL_CHANNEL {
            tracing::warn!("control messages may have been missed; recovering them");
            return self.control.on_gap();
        }
        // The legacy dialect has no gap frame: its clients are closed so they reconnect.
        let told = self.hub.gap(channel, channel == DEFAULT_CHANNEL);
        self.stats.gap(told);
        tracing::warn!(
            channel,
            told,
            "publications may have been missed; subscribers told"
        );
    }
}
