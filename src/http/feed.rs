//! A [`Feed`]: the clear (decrypted, or not yet encrypted) frames of one room on this node,
//! shared by every local WHEP player.
//!
//! Where the frames come from depends on the node's part in the room: a viewer's playback
//! pipeline hands its decrypted frames over through [`Feed::sink_target`] (a
//! [`SinkTarget::Frames`] channel); a broadcaster's sources are wrapped by [`Feed::tap`], so the
//! frames are copied before they are encrypted; a WHIP publisher's frames are pushed directly.
//! Several players share one feed, and so one tree membership: the frames fan out through a
//! bounded `tokio::sync::broadcast` channel, where a player that falls behind loses the oldest
//! frames (and then waits for a keyframe) instead of holding up the others.
//!
//! A player that starts mid-stream needs a keyframe: [`Feed::request_keyframe`] passes the
//! request to the feed's owner (the viewer asks its parent, a WHIP publisher gets a PLI; a file
//! cannot make one and the player waits for the next).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};

use crate::media::{Codec, MediaKind, MediaSource, Sample, SinkTarget, SourceError};

/// Frames a feed holds for players that lag (about 4 s of 30 fps video and 50/s audio).
pub const FEED_FRAMES: usize = 256;
/// Frames queued between a viewer's playback pipeline and the feed.
const TAP_QUEUE: usize = 256;
/// Keyframe requests queued for the feed's owner (more are the same request).
const KEYFRAME_QUEUE: usize = 4;

/// The clear frames of one room on this node, for local players. Cheap to clone.
#[derive(Clone)]
pub struct Feed {
    inner: Arc<Inner>,
}

struct Inner {
    tx: broadcast::Sender<Sample>,
    tracks: watch::Sender<Vec<(MediaKind, Codec)>>,
    keyframe: mpsc::Sender<()>,
    /// Set once the room is over for this node: its players end.
    ended: watch::Sender<bool>,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("tracks", &*self.inner.tracks.borrow())
            .field("players", &self.inner.tx.receiver_count())
            .finish()
    }
}

impl Feed {
    /// A feed of `tracks` (empty: learnt from the first frame of each kind). The receiver gets
    /// the players' keyframe requests; the owner acts on them or drops it.
    pub fn new(tracks: Vec<(MediaKind, Codec)>) -> (Feed, mpsc::Receiver<()>) {
        let (tx, _) = broadcast::channel(FEED_FRAMES);
        let (kf_tx, kf_rx) = mpsc::channel(KEYFRAME_QUEUE);
        let (tracks, _) = watch::channel(tracks);
        let (ended, _) = watch::channel(false);
        (
            Feed {
                inner: Arc::new(Inner {
                    tx,
                    tracks,
                    keyframe: kf_tx,
                    ended,
                }),
            },
            kf_rx,
        )
    }

    /// Hands a frame to every player (none listening is fine).
    pub fn push(&self, sample: Sample) {
        let (kind, codec) = (sample.kind, sample.codec);
        self.inner.tracks.send_if_modified(|t| {
            if t.iter().any(|(k, _)| *k == kind) {
                return false;
            }
            t.push((kind, codec));
            true
        });
        let _ = self.inner.tx.send(sample);
    }

    /// The tracks known so far.
    pub fn tracks(&self) -> Vec<(MediaKind, Codec)> {
        self.inner.tracks.borrow().clone()
    }

    /// The tracks once at least one is known, waiting at most `wait` for the first and then a
    /// moment for a second kind (a viewer's audio and video start within milliseconds of each
    /// other); empty when nothing came.
    pub async fn tracks_within(&self, wait: Duration) -> Vec<(MediaKind, Codec)> {
        let mut rx = self.inner.tracks.subscribe();
        if tokio::time::timeout(wait, rx.wait_for(|t| !t.is_empty()))
            .await
            .is_err()
        {
            return Vec::new();
        }
        let _ = tokio::time::timeout(SECOND_KIND_WAIT, rx.wait_for(|t| t.len() >= 2)).await;
        self.tracks()
    }

    /// A player's view of the frames.
    pub fn subscribe(&self) -> broadcast::Receiver<Sample> {
        self.inner.tx.subscribe()
    }

    /// Players listening now.
    pub fn players(&self) -> usize {
        self.inner.tx.receiver_count()
    }

    /// The room is over for this node (its owner left): every player ends.
    pub fn end(&self) {
        self.inner.ended.send_replace(true);
    }

    /// Resolves once [`Feed::end`] was called.
    pub async fn ended(&self) {
        let mut rx = self.inner.ended.subscribe();
        let _ = rx.wait_for(|e| *e).await;
    }

    /// Ask the feed's owner for a keyframe (dropped when requests are already queued).
    pub fn request_keyframe(&self) {
        let _ = self.inner.keyframe.try_send(());
    }

    /// A sink target for a viewer's playback ([`crate::WatchConfig::sinks`], audio and video):
    /// its decrypted frames come into this feed. Spawns the forwarding task (it ends when the
    /// viewer's sinks are gone), so call it inside the runtime.
    pub fn sink_target(&self) -> SinkTarget {
        let (tx, mut rx) = mpsc::channel::<Sample>(TAP_QUEUE);
        let feed = self.clone();
        tokio::spawn(async move {
            while let Some(s) = rx.recv().await {
                feed.push(s);
            }
        });
        SinkTarget::Frames(tx)
    }

    /// A source that reads `src` and copies each frame into this feed before the broadcaster
    /// encrypts it (the broadcaster's own players see what it sends).
    pub fn tap(&self, src: Box<dyn MediaSource>) -> Box<dyn MediaSource> {
        Box::new(TapSource {
            src,
            feed: self.clone(),
        })
    }
}

/// How long a feed that knows one kind waits for the other (see [`Feed::tracks_within`]).
const SECOND_KIND_WAIT: Duration = Duration::from_millis(700);

struct TapSource {
    src: Box<dyn MediaSource>,
    feed: Feed,
}

#[async_trait::async_trait]
impl MediaSource for TapSource {
    fn codec(&self) -> Codec {
        self.src.codec()
    }
    async fn next_sample(&mut self) -> Result<Option<Sample>, SourceError> {
        let s = self.src.next_sample().await?;
        if let Some(s) = &s {
            self.feed.push(s.clone());
        }
        Ok(s)
    }
    fn keyframe_requests(&self) -> Option<mpsc::Sender<()>> {
        self.src.keyframe_requests()
    }
}

/// A [`MediaSource`] fed from a channel: the frames a WHIP publisher sends, depacketized, go to
/// the broadcaster through it; keyframe requests come back out of it.
pub(crate) struct ChannelSource {
    pub(crate) codec: Codec,
    pub(crate) rx: mpsc::Receiver<Sample>,
    pub(crate) keyframe: mpsc::Sender<()>,
}

#[async_trait::async_trait]
impl MediaSource for ChannelSource {
    fn codec(&self) -> Codec {
        self.codec
    }
    async fn next_sample(&mut self) -> Result<Option<Sample>, SourceError> {
        Ok(self.rx.recv().await)
    }
    fn keyframe_requests(&self) -> Option<mpsc::Sender<()>> {
        Some(self.keyframe.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn sample(kind: MediaKind, codec: Codec, n: u8) -> Sample {
        Sample {
            kind,
            codec,
            data: Bytes::from(vec![n]),
            pts: Duration::from_millis(n as u64 * 33),
            duration: Duration::ZERO,
            keyframe: n == 0,
        }
    }

    #[tokio::test]
    async fn feed_learns_tracks_and_fans_out_to_every_player() {
        let (feed, mut kf) = Feed::new(Vec::new());
        assert!(feed.tracks().is_empty());
        let mut a = feed.subscribe();
        let mut b = feed.subscribe();
        assert_eq!(feed.players(), 2);
        feed.push(sample(MediaKind::Video, Codec::Vp8, 0));
        feed.push(sample(MediaKind::Audio, Codec::Opus, 1));
        assert_eq!(
            feed.tracks_within(Duration::from_millis(10)).await,
            vec![
                (MediaKind::Video, Codec::Vp8),
                (MediaKind::Audio, Codec::Opus)
            ]
        );
        for rx in [&mut a, &mut b] {
            assert_eq!(rx.recv().await.unwrap().data[0], 0);
            assert_eq!(rx.recv().await.unwrap().kind, MediaKind::Audio);
        }
        feed.request_keyframe();
        feed.request_keyframe();
        assert!(kf.try_recv().is_ok());
        let f2 = feed.clone();
        let waiting = tokio::spawn(async move { f2.ended().await });
        feed.end();
        tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("players see the end")
            .unwrap();
    }

    #[tokio::test]
    async fn a_lagging_player_loses_old_frames_not_the_feed() {
        let (feed, _kf) = Feed::new(vec![(MediaKind::Video, Codec::Vp8)]);
        let mut slow = feed.subscribe();
        for i in 0..(FEED_FRAMES + 10) {
            feed.push(sample(MediaKind::Video, Codec::Vp8, (i % 250) as u8));
        }
        assert!(matches!(
            slow.recv().await,
            Err(broadcast::error::RecvError::Lagged(10))
        ));
    }

    #[tokio::test]
    async fn sink_target_forwards_a_viewers_frames() {
        let (feed, _kf) = Feed::new(Vec::new());
        let mut rx = feed.subscribe();
        let SinkTarget::Frames(tx) = feed.sink_target() else {
            panic!("a frame target")
        };
        tx.send(sample(MediaKind::Video, Codec::Vp9, 7))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((got.codec, got.data[0]), (Codec::Vp9, 7));
    }
}
