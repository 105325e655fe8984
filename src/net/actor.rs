//! The actor task: owns the swarm, serves commands, turns swarm events into [`NetEvent`]s.
//!
//! Pending long operations live in maps keyed by libp2p ids (`QueryId`, `OutboundRequestId`,
//! `ConnectionId`) and are completed by the matching swarm event; a housekeeping tick enforces
//! `get_record` deadlines, retries queued gossip, forgets unanswered inbound requests and lifts
//! expired bans. Every map is bounded (see the constants in [`super`]).
//!
//! Reachability, relays, bootstrap retries and hole punching live in [`reach`]; the public
//! Amino DHT (provider records) in [`public`].
//!
//! About 1,100 lines: the swarm loop and the handlers of every behaviour's events, which share
//! the actor's pending-operation maps; reachability and relays (`reach`) and the public DHT
//! (`public`) are in files of their own.

mod public;
mod reach;

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use futures::StreamExt;
use libp2p::{
    Multiaddr, PeerId, Swarm, gossipsub, identify,
    kad::{self, GetRecordOk, QueryId, QueryResult, Quorum, Record, RecordKey, store::RecordStore},
    mdns,
    multiaddr::Protocol,
    request_response::{self, InboundRequestId, OutboundRequestId, ResponseChannel},
    swarm::{ConnectionId, SwarmEvent, dial_opts::DialOpts},
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info, trace, warn};

use super::{
    GossipVerdict, MAX_GOSSIP_BYTES, MAX_PENDING_INBOUND, MAX_PENDING_INBOUND_PER_PEER,
    MAX_PENDING_QUERIES, MAX_STRIKES, NetConfig, NetError, NetEvent, NetNotice, NetStatus,
    PENDING_PUBLISH_PER_TOPIC, PENDING_PUBLISH_TOPICS, PENDING_PUBLISH_TTL, PUBLIC_KAD_PROTOCOL,
    Published, RecordValidator, ResponseHandle, Result, WATERFALL_KAD_PROTOCOL,
    behaviour::{Behaviour, BehaviourEvent, build_swarm},
    codec::Body,
    records::{self, Refusal},
};

/// Housekeeping period: the granularity of `get_record` deadlines and publish retries.
const TICK: Duration = Duration::from_millis(100);
/// Unanswered inbound requests are forgotten after this long (the requester gave up).
const INBOUND_TTL: Duration = Duration::from_secs(60);
/// After the first valid record, how long a lookup keeps collecting other copies.
const GET_GRACE: Duration = Duration::from_millis(1000);
/// Distinct records collected per `get_record` (a key has one owner; more is noise or attack).
const MAX_RECORDS_PER_GET: usize = 16;
/// LAN peers remembered for redialling.
const MAX_LAN_PEERS: usize = 256;
/// Longest pause between redials of a LAN peer.
const LAN_REDIAL_MAX: Duration = Duration::from_secs(60);
/// Peers whose strikes are remembered at once.
const MAX_TRACKED_OFFENDERS: usize = 4096;
/// Addresses taken from one identify message.
const MAX_IDENTIFY_ADDRS: usize = 16;
/// How often expired records leave the store (kad's own sweep runs hourly).
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// A node stores a record for others only if fewer than this many peers of its routing table
/// are closer to the key than itself: honest publishers put to the k (20) closest peers they
/// find, so a node with twice that many closer peers is not one of them, and a stranger
/// choosing keys at will cannot make every node store everything. The margin covers routing
/// tables that differ between nodes.
const CLOSENESS_MARGIN: usize = 40;

pub(crate) enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Addrs(oneshot::Sender<Vec<Multiaddr>>),
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId>>,
    },
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    PutRecord {
        key: Vec<u8>,
        value: Vec<u8>,
        reply: oneshot::Sender<Result<()>>,
    },
    GetRecord {
        key: Vec<u8>,
        timeout: Duration,
        reply: oneshot::Sender<oneshot::Receiver<Result<Vec<Vec<u8>>>>>,
    },
    RemoveRecord {
        key: Vec<u8>,
        reply: oneshot::Sender<bool>,
    },
    Subscribe {
        topic: String,
        reply: oneshot::Sender<Result<bool>>,
    },
    Unsubscribe {
        topic: String,
        reply: oneshot::Sender<bool>,
    },
    Publish {
        topic: String,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<Published>>,
    },
    Request {
        peer: PeerId,
        data: Vec<u8>,
        reply: oneshot::Sender<oneshot::Receiver<Result<Vec<u8>>>>,
    },
    Respond {
        id: u64,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<()>>,
    },
    /// A [`ResponseHandle`] was dropped unanswered: free its slot (the requester's stream
    /// closes, so it fails at once rather than at its timeout).
    Forget {
        id: u64,
    },
    ProvidePublic {
        key: Vec<u8>,
        reply: oneshot::Sender<Result<()>>,
    },
    StopProvidingPublic {
        key: Vec<u8>,
        reply: oneshot::Sender<bool>,
    },
    FindProviders {
        key: Vec<u8>,
        timeout: Duration,
        reply: oneshot::Sender<oneshot::Receiver<Result<Vec<PeerId>>>>,
    },
    Status(oneshot::Sender<NetStatus>),
    Shutdown,
}

struct PendingGet {
    key: Vec<u8>,
    /// Signer of our live local copy, if any: copies by other signers are not the record.
    owner: Option<Vec<u8>>,
    deadline: Instant,
    /// (seq, value), distinct values.
    found: Vec<(u64, Vec<u8>)>,
    reply: oneshot::Sender<Result<Vec<Vec<u8>>>>,
}

struct OwnRecord {
    value: Vec<u8>,
    expires_unix_ms: u64,
    /// How long others hold it ([`super::RecordMeta::hold_for`]): republished at half that.
    hold_for: Duration,
    next_republish: Instant,
}

/// A peer found by mDNS, redialled until connected.
struct LanPeer {
    addrs: Vec<Multiaddr>,
    next_dial: Instant,
    attempts: u32,
}

struct PendingInbound {
    channel: ResponseChannel<Body>,
    peer: PeerId,
    since: Instant,
}

pub(crate) struct Actor {
    swarm: Swarm<Behaviour>,
    cmd_rx: mpsc::Receiver<Command>,
    cmd_weak: mpsc::WeakSender<Command>,
    events: mpsc::Sender<NetEvent>,
    validator: RecordValidator,
    gossip_validator: super::GossipValidator,
    republish_interval: Duration,
    ban_duration: Duration,
    max_request_bytes: usize,
    max_response_bytes: usize,
    public: bool,
    listen_addrs: Vec<Multiaddr>,
    /// Open connections that leave this host, with the local IP of those we accepted (a
    /// dialled connection's local address is not known): see [`Actor::drop_dead_connections`].
    /// As bounded as the swarm's connections.
    remote_conns: HashMap<ConnectionId, Option<std::net::IpAddr>>,
    dials: HashMap<ConnectionId, oneshot::Sender<Result<PeerId>>>,
    puts: HashMap<QueryId, oneshot::Sender<Result<()>>>,
    gets: HashMap<QueryId, PendingGet>,
    requests: HashMap<OutboundRequestId, oneshot::Sender<Result<Vec<u8>>>>,
    inbound: HashMap<u64, PendingInbound>,
    inbound_ids: HashMap<InboundRequestId, u64>,
    next_inbound: u64,
    own: HashMap<Vec<u8>, OwnRecord>,
    pending_publish: HashMap<String, VecDeque<(Vec<u8>, Instant)>>,
    strikes: HashMap<PeerId, u32>,
    banned: HashMap<PeerId, Instant>,
    lan_peers: HashMap<PeerId, LanPeer>,
    kad_bootstrapped: bool,
    dropped_events: u64,
    next_sweep: Instant,
    reach: reach::Reach,
    amino: public::Public,
}

impl Actor {
    pub(crate) fn new(
        config: NetConfig,
        cmd_rx: mpsc::Receiver<Command>,
        cmd_weak: mpsc::WeakSender<Command>,
        events: mpsc::Sender<NetEvent>,
        notices: broadcast::Sender<NetNotice>,
    ) -> Result<Self> {
        let reach = reach::Reach::new(&config, notices);
        let mut swarm = build_swarm(&config)?;
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| NetError::Listen {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
        }
        let mut actor = Actor {
            swarm,
            cmd_rx,
            cmd_weak,
            events,
            validator: config.record_validator.clone(),
            gossip_validator: config.gossip_validator.clone(),
            republish_interval: config.republish_interval,
            ban_duration: config.ban_duration,
            max_request_bytes: config.max_request_bytes,
            max_response_bytes: config.max_response_bytes,
            public: config.public,
            listen_addrs: Vec::new(),
            remote_conns: HashMap::new(),
            dials: HashMap::new(),
            puts: HashMap::new(),
            gets: HashMap::new(),
            requests: HashMap::new(),
            inbound: HashMap::new(),
            inbound_ids: HashMap::new(),
            next_inbound: 0,
            own: HashMap::new(),
            pending_publish: HashMap::new(),
            strikes: HashMap::new(),
            banned: HashMap::new(),
            lan_peers: HashMap::new(),
            kad_bootstrapped: false,
            dropped_events: 0,
            next_sweep: Instant::now() + SWEEP_INTERVAL,
            reach,
            amino: public::Public::new(),
        };
        for addr in &config.bootstrap {
            if let Some(peer) = peer_id_of(addr) {
                actor
                    .swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer, addr.clone());
            }
        }
        for addr in &config.external_addrs {
            actor.confirm_external(addr.clone());
        }
        actor.dial_bootstrap();
        Ok(actor)
    }

    /// The actor's span: a root span per node (never nested under whoever spawned it).
    pub(crate) fn span(&self) -> tracing::Span {
        tracing::info_span!(parent: None, "net", peer = %self.swarm.local_peer_id())
    }

    pub(crate) async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut republish = tokio::time::interval(self.republish_interval);
        republish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        republish.tick().await; // the first tick is immediate; nothing to republish yet
        loop {
            tokio::select! {
                // Local work before remote input (rust-libp2p coding guidelines).
                biased;
                cmd = self.cmd_rx.recv() => match cmd {
                    None | Some(Command::Shutdown) => break,
                    Some(cmd) => self.on_command(cmd),
                },
                _ = tick.tick() => self.housekeeping(),
                _ = republish.tick() => self.republish(true),
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
            }
        }
        debug!("network actor stopped");
    }

    fn emit(&mut self, ev: NetEvent) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.events.try_send(ev) {
            self.note_dropped_event();
        }
    }

    fn note_dropped_event(&mut self) {
        self.dropped_events += 1;
        // Log sparsely: a lagging application must not flood the log either.
        if self.dropped_events.is_power_of_two() {
            warn!(
                dropped = self.dropped_events,
                "event receiver lagging, events dropped"
            );
        }
    }

    // ----- commands -----

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.listen_addrs.clone());
            }
            Command::Addrs(reply) => {
                let _ = reply.send(self.advertised_addrs());
            }
            Command::Dial { addr, reply } => self.dial(addr, reply),
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::PutRecord { key, value, reply } => self.put_record(key, value, reply),
            Command::GetRecord {
                key,
                timeout,
                reply,
            } => self.get_record(key, timeout, answer_later(reply)),
            Command::RemoveRecord { key, reply } => {
                let removed = self.own.remove(&key).is_some();
                if removed {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .store_mut()
                        .remove_own(&RecordKey::new(&key));
                }
                let _ = reply.send(removed);
            }
            Command::Subscribe { topic, reply } => {
                let t = gossipsub::IdentTopic::new(topic);
                let r = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .subscribe(&t)
                    .map_err(|e| NetError::Subscribe(e.to_string()));
                let _ = reply.send(r);
            }
            Command::Unsubscribe { topic, reply } => {
                self.pending_publish.remove(&topic);
                let t = gossipsub::IdentTopic::new(topic);
                let _ = reply.send(self.swarm.behaviour_mut().gossipsub.unsubscribe(&t));
            }
            Command::Publish { topic, data, reply } => {
                let _ = reply.send(self.publish(topic, data));
            }
            Command::Request { peer, data, reply } => {
                let (tx, rx) = oneshot::channel();
                let _ = reply.send(rx);
                if data.len() > self.max_request_bytes {
                    let _ = tx.send(Err(NetError::TooLarge {
                        size: data.len(),
                        max: self.max_request_bytes,
                    }));
                    return;
                }
                if self.requests.len() >= MAX_PENDING_QUERIES {
                    let _ = tx.send(Err(NetError::Busy));
                    return;
                }
                let id = self
                    .swarm
                    .behaviour_mut()
                    .rr
                    .send_request(&peer, Body::Data(data));
                self.requests.insert(id, tx);
            }
            Command::Respond { id, data, reply } => {
                if data.len() > self.max_response_bytes {
                    let _ = reply.send(Err(NetError::TooLarge {
                        size: data.len(),
                        max: self.max_response_bytes,
                    }));
                    return;
                }
                let r = match self.inbound.remove(&id) {
                    None => Err(NetError::UnknownRequest),
                    Some(p) => self
                        .swarm
                        .behaviour_mut()
                        .rr
                        .send_response(p.channel, Body::Data(data))
                        .map_err(|_| NetError::UnknownRequest),
                };
                let _ = reply.send(r);
            }
            Command::Forget { id } => {
                self.inbound.remove(&id);
            }
            Command::ProvidePublic { key, reply } => {
                let _ = reply.send(self.public_provide(&key));
            }
            Command::StopProvidingPublic { key, reply } => {
                let _ = reply.send(self.public_stop(&key));
            }
            Command::FindProviders {
                key,
                timeout,
                reply,
            } => self.public_find(&key, timeout, answer_later(reply)),
            Command::Status(reply) => {
                let b = self.swarm.behaviour_mut();
                let (own, foreign) = b.kad.store_mut().counts();
                let dht_records = own + foreign;
                let dht_peers = b.kad.kbuckets().map(|k| k.num_entries()).sum();
                let topics = b.gossipsub.topics().map(|t| t.to_string()).collect();
                let peers = self.swarm.connected_peers().count();
                let _ = reply.send(NetStatus {
                    peers,
                    dht_peers,
                    dht_records,
                    topics,
                    reachability: self.reach.reachability(),
                    external_addrs: self.swarm.external_addresses().cloned().collect(),
                    relays: self.reach.reserved_relays(),
                    relay_serving: self.reach.serving(),
                });
            }
            Command::Shutdown => unreachable!("handled in run"),
        }
    }

    fn dial(&mut self, addr: Multiaddr, reply: oneshot::Sender<Result<PeerId>>) {
        if self.dials.len() >= MAX_PENDING_QUERIES {
            let _ = reply.send(Err(NetError::Busy));
            return;
        }
        let opts = match peer_id_of(&addr) {
            Some(peer) => {
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(peer));
                    return;
                }
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer, addr.clone());
                DialOpts::peer_id(peer).addresses(vec![addr]).build()
            }
            None => DialOpts::unknown_peer_id().address(addr).build(),
        };
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.dials.insert(id, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(NetError::Dial(e.to_string())));
            }
        }
    }

    fn put_record(&mut self, key: Vec<u8>, value: Vec<u8>, reply: oneshot::Sender<Result<()>>) {
        let rkey = RecordKey::new(&key);
        // Only our own earlier copy can refuse our put: a copy someone else put here (a squatter
        // who got to the key first) does not own our store.
        let stored = self
            .swarm
            .behaviour_mut()
            .kad
            .store_mut()
            .own(&rkey)
            .map(|r| r.value.clone());
        let now = records::now_unix_ms();
        let checked = match records::admit(&self.validator, &key, &value, stored.as_deref(), now) {
            Ok(c) => c,
            Err(refusal) => {
                let _ = reply.send(Err(match refusal {
                    Refusal::TooLarge(size) => NetError::RecordTooLarge {
                        size,
                        max: super::MAX_RECORD_BYTES,
                    },
                    Refusal::Invalid(why) => NetError::InvalidRecord(why),
                    Refusal::Expired | Refusal::LifetimeTooLong => NetError::BadLifetime,
                    Refusal::NotOwner => NetError::NotOwner,
                    Refusal::Stale => NetError::StaleRecord,
                }));
                return;
            }
        };
        if self.puts.len() >= MAX_PENDING_QUERIES {
            let _ = reply.send(Err(NetError::Busy));
            return;
        }
        if self.own.len() >= super::MAX_OWN_RECORDS && !self.own.contains_key(&key) {
            self.own.retain(|_, r| r.expires_unix_ms > now);
            if self.own.len() >= super::MAX_OWN_RECORDS {
                let _ = reply.send(Err(NetError::Busy));
                return;
            }
        }
        let hold_for = checked.meta.hold_for;
        self.own.insert(
            key.clone(),
            OwnRecord {
                value: value.clone(),
                expires_unix_ms: checked.meta.expires_unix_ms,
                hold_for,
                next_republish: Instant::now() + self.republish_every(hold_for),
            },
        );
        match self.put_to_dht(key, value, checked.remaining) {
            Ok(id) => {
                self.puts.insert(id, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    fn put_to_dht(&mut self, key: Vec<u8>, value: Vec<u8>, remaining: Duration) -> Result<QueryId> {
        let mut record = Record::new(key, value);
        record.expires = Some(Instant::now() + remaining);
        self.swarm
            .behaviour_mut()
            .kad
            .put_record(record, Quorum::One)
            .map_err(|e| NetError::InvalidRecord(format!("local store: {e}")))
    }

    /// How often an own record is put again: before others stop holding it, at the latest
    /// every [`NetConfig::republish_interval`].
    fn republish_every(&self, hold_for: Duration) -> Duration {
        republish_every(hold_for, self.republish_interval)
    }

    /// Put again every own record that is due (`all`: every one).
    fn republish(&mut self, all: bool) {
        let now = records::now_unix_ms();
        self.own.retain(|_, r| r.expires_unix_ms > now);
        let at = Instant::now();
        let mut live = Vec::new();
        for (k, r) in self.own.iter_mut() {
            if all || r.next_republish <= at {
                r.next_republish = at + republish_every(r.hold_for, self.republish_interval);
                // Due by its own timer only if it outlives the copies held since the last put
                // (a signalling blob that expires within its hold time never needs it).
                let half_hold = u64::try_from((r.hold_for / 2).as_millis()).unwrap_or(u64::MAX);
                if all || r.expires_unix_ms > now.saturating_add(half_hold) {
                    live.push((k.clone(), r.value.clone(), r.expires_unix_ms));
                }
            }
        }
        for (key, value, expires) in live {
            let remaining = Duration::from_millis(expires.saturating_sub(now));
            if let Err(e) = self.put_to_dht(key, value, remaining) {
                debug!(error = %e, "republish failed");
            }
        }
    }

    fn get_record(
        &mut self,
        key: Vec<u8>,
        timeout: Duration,
        reply: oneshot::Sender<Result<Vec<Vec<u8>>>>,
    ) {
        if self.gets.len() >= MAX_PENDING_QUERIES {
            let _ = reply.send(Err(NetError::Busy));
            return;
        }
        let rkey = RecordKey::new(&key);
        let kad = &mut self.swarm.behaviour_mut().kad;
        // Copies by other signers are dropped only when the key is ours: a copy someone else put
        // here may be a squatter's, and the caller must see every claimant.
        let owner = kad.store_mut().own(&rkey).and_then(|r| {
            records::check(&self.validator, &key, &r.value, records::now_unix_ms())
                .ok()
                .map(|c| c.meta.signer)
        });
        let id = kad.get_record(rkey);
        self.gets.insert(
            id,
            PendingGet {
                key,
                owner,
                deadline: Instant::now() + timeout,
                found: Vec::new(),
                reply,
            },
        );
    }

    /// One gossipsub publish (gossipsub takes the data; ours stays queued if it fails).
    fn gossip(
        &mut self,
        topic: &str,
        data: &[u8],
    ) -> std::result::Result<gossipsub::MessageId, gossipsub::PublishError> {
        let t = gossipsub::IdentTopic::new(topic);
        self.swarm
            .behaviour_mut()
            .gossipsub
            .publish(t, data.to_vec())
    }

    fn publish(&mut self, topic: String, data: Vec<u8>) -> Result<Published> {
        if data.len() > MAX_GOSSIP_BYTES {
            return Err(NetError::TooLarge {
                size: data.len(),
                max: MAX_GOSSIP_BYTES,
            });
        }
        match self.gossip(&topic, &data) {
            Ok(_) => Ok(Published::Sent),
            Err(
                gossipsub::PublishError::NoPeersSubscribedToTopic
                | gossipsub::PublishError::AllQueuesFull(_),
            ) => {
                if !self.pending_publish.contains_key(&topic)
                    && self.pending_publish.len() >= PENDING_PUBLISH_TOPICS
                {
                    return Err(NetError::Publish(
                        "too many topics with queued messages".into(),
                    ));
                }
                let q = self.pending_publish.entry(topic).or_default();
                if q.len() >= PENDING_PUBLISH_PER_TOPIC {
                    // Keep the newest: a later tree update supersedes an older one.
                    q.pop_front();
                }
                q.push_back((data, Instant::now()));
                Ok(Published::Queued)
            }
            Err(gossipsub::PublishError::MessageTooLarge) => Err(NetError::TooLarge {
                size: data.len(),
                max: MAX_GOSSIP_BYTES,
            }),
            Err(e) => Err(NetError::Publish(e.to_string())),
        }
    }

    /// Retry queued messages of `topic` (all topics if `None`), dropping stale ones.
    fn flush_pending(&mut self, only: Option<&str>) {
        let now = Instant::now();
        let topics: Vec<String> = match only {
            Some(t) if self.pending_publish.contains_key(t) => vec![t.to_owned()],
            Some(_) => return,
            None => self.pending_publish.keys().cloned().collect(),
        };
        for topic in topics {
            let Some(mut q) = self.pending_publish.remove(&topic) else {
                continue;
            };
            q.retain(|(_, at)| now.duration_since(*at) < PENDING_PUBLISH_TTL);
            while let Some((data, at)) = q.pop_front() {
                match self.gossip(&topic, &data) {
                    Ok(_) => trace!(%topic, "queued message published"),
                    Err(
                        gossipsub::PublishError::NoPeersSubscribedToTopic
                        | gossipsub::PublishError::AllQueuesFull(_),
                    ) => {
                        q.push_front((data, at));
                        break;
                    }
                    Err(e) => debug!(%topic, error = %e, "queued message dropped"),
                }
            }
            if !q.is_empty() {
                self.pending_publish.insert(topic, q);
            }
        }
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        // get_record deadlines: return what we have, or Timeout.
        let due: Vec<QueryId> = self
            .gets
            .iter()
            .filter(|(_, g)| g.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                q.finish();
            }
            if let Some(g) = self.gets.remove(&id) {
                finish_get(g, Err(NetError::Timeout));
            }
        }
        if !self.pending_publish.is_empty() {
            self.flush_pending(None);
        }
        if !self.lan_peers.is_empty() {
            self.dial_lan_peers();
        }
        self.reach_housekeeping();
        self.public_housekeeping();
        if self.next_sweep <= now {
            self.next_sweep = now + SWEEP_INTERVAL;
            self.swarm.behaviour_mut().kad.store_mut().sweep(now);
            self.republish(false);
        }
        self.inbound
            .retain(|_, p| now.duration_since(p.since) < INBOUND_TTL);
        self.inbound_ids
            .retain(|_, id| self.inbound.contains_key(id));
        let expired: Vec<PeerId> = self
            .banned
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in expired {
            self.banned.remove(&peer);
            self.swarm.behaviour_mut().blocked.unblock_peer(peer);
            debug!(%peer, "ban lifted");
        }
    }

    /// Dial LAN peers found by mDNS that we are not connected to, with exponential backoff: a
    /// first dial can fail (both sides dialling at once, link not up yet) and mDNS reports a
    /// peer only once per address.
    fn dial_lan_peers(&mut self) {
        let now = Instant::now();
        let due: Vec<(PeerId, Vec<Multiaddr>)> = self
            .lan_peers
            .iter()
            .filter(|(p, e)| e.next_dial <= now && !self.swarm.is_connected(p))
            .map(|(p, e)| (*p, e.addrs.clone()))
            .collect();
        for (peer, addrs) in due {
            if let Some(e) = self.lan_peers.get_mut(&peer) {
                e.attempts = e.attempts.saturating_add(1);
                let backoff = Duration::from_millis(500) * 2u32.saturating_pow(e.attempts.min(7));
                e.next_dial = now + backoff.min(LAN_REDIAL_MAX);
            }
            let opts = DialOpts::peer_id(peer).addresses(addrs).build();
            if let Err(e) = self.swarm.dial(opts) {
                debug!(%peer, error = %e, "dialling LAN peer failed");
            }
        }
    }

    /// Count a misbehaviour of `peer`; block it for the ban duration at [`MAX_STRIKES`].
    fn strike(&mut self, peer: PeerId, why: &str) {
        if peer == *self.swarm.local_peer_id() {
            return;
        }
        if self.strikes.len() >= MAX_TRACKED_OFFENDERS && !self.strikes.contains_key(&peer) {
            // Bounded memory under a flood of identities: forget old offenders.
            self.strikes.clear();
        }
        let n = self.strikes.entry(peer).or_default();
        *n += 1;
        info!(%peer, strikes = *n, why, "peer misbehaved");
        if *n >= MAX_STRIKES {
            self.strikes.remove(&peer);
            warn!(%peer, "blocking misbehaving peer");
            let b = self.swarm.behaviour_mut();
            if self.banned.len() < MAX_TRACKED_OFFENDERS {
                self.banned.insert(peer, Instant::now() + self.ban_duration);
                b.blocked.block_peer(peer);
            } else {
                // Ban list full: at least cut the current connections.
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            let b = self.swarm.behaviour_mut();
            b.kad.remove_peer(&peer);
            if let Some(k) = b.public_kad.as_mut() {
                k.remove_peer(&peer);
            }
        }
    }

    // ----- swarm events -----

    /// A listen address expired. When it was the last on its IP, that IP has left this host
    /// (a network change): connections over it are dead but would look open until a timeout,
    /// and requests sent on them would wait for it. Close them now; the next request dials
    /// again from the addresses there are. Accepted connections are closed when they arrived
    /// on that IP; dialled ones, whose local address is unknown, whenever they leave the host
    /// (a multi-homed host losing one address redials some healthy connections: cheap).
    fn drop_dead_connections(&mut self, expired: &Multiaddr) {
        let Some(gone) = ip_of(expired) else {
            return;
        };
        if gone.is_loopback() || self.listen_addrs.iter().any(|a| ip_of(a) == Some(gone)) {
            return;
        }
        let dead: Vec<ConnectionId> = self
            .remote_conns
            .iter()
            .filter(|(_, local)| local.is_none_or(|ip| ip == gone))
            .map(|(id, _)| *id)
            .collect();
        if !dead.is_empty() {
            info!(address = %gone, connections = dead.len(), "address gone: closing the connections that used it");
        }
        for id in dead {
            self.remote_conns.remove(&id);
            self.swarm.close_connection(id);
        }
    }

    fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        self.reach_on_swarm_event(&ev);
        let addrs_may_change = reach::changes_addrs(&ev);
        match ev {
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev),
            SwarmEvent::NewListenAddr { address, .. } => {
                debug!(%address, "listening");
                self.listen_addrs.push(address.clone());
                self.emit(NetEvent::Listening(address));
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
                self.drop_dead_connections(&address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                num_established,
                endpoint,
                ..
            } => {
                if ip_of(endpoint.get_remote_address()).is_some_and(|ip| !ip.is_loopback()) {
                    let local = match &endpoint {
                        libp2p::core::ConnectedPoint::Listener { local_addr, .. } => {
                            ip_of(local_addr)
                        }
                        libp2p::core::ConnectedPoint::Dialer { .. } => None,
                    };
                    self.remote_conns.insert(connection_id, local);
                }
                if let Some(reply) = self.dials.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                }
                if let Some(e) = self.lan_peers.get_mut(&peer_id) {
                    e.attempts = 0;
                }
                if num_established.get() == 1 {
                    self.emit(NetEvent::PeerConnected(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed {
                connection_id,
                num_established,
                ..
            } if num_established > 0 => {
                self.remote_conns.remove(&connection_id);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                ..
            } => {
                self.remote_conns.remove(&connection_id);
                // Strikes outlive the connection: reconnecting does not wash them away.
                self.emit(NetEvent::PeerDisconnected(peer_id));
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                peer_id,
            } => {
                debug!(?peer_id, %error, "outgoing connection failed");
                if let Some(reply) = self.dials.remove(&connection_id) {
                    let _ = reply.send(Err(NetError::Dial(error.to_string())));
                }
            }
            _ => {}
        }
        if addrs_may_change {
            self.addrs_maybe_changed();
        }
    }

    fn on_behaviour_event(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                self.on_identify(peer_id, info);
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(list)) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in list {
                    by_peer.entry(peer).or_default().push(addr);
                }
                for (peer, addrs) in by_peer {
                    if self.banned.contains_key(&peer) {
                        continue;
                    }
                    for a in &addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer, a.clone());
                    }
                    if self.lan_peers.len() < MAX_LAN_PEERS || self.lan_peers.contains_key(&peer) {
                        let entry = self.lan_peers.entry(peer).or_insert_with(|| LanPeer {
                            addrs: Vec::new(),
                            next_dial: Instant::now(),
                            attempts: 0,
                        });
                        for a in &addrs {
                            if !entry.addrs.contains(a) && entry.addrs.len() < MAX_IDENTIFY_ADDRS {
                                entry.addrs.push(a.clone());
                            }
                        }
                    }
                    self.emit(NetEvent::Discovered(peer, addrs));
                }
                self.dial_lan_peers();
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(list)) => {
                for (peer, addr) in list {
                    if let Some(e) = self.lan_peers.get_mut(&peer) {
                        e.addrs.retain(|a| *a != addr);
                        if e.addrs.is_empty() {
                            self.lan_peers.remove(&peer);
                        }
                    }
                }
            }
            BehaviourEvent::Kad(ev) => self.on_kad(ev),
            BehaviourEvent::PublicKad(ev) => self.on_public_kad(ev),
            BehaviourEvent::Gossipsub(ev) => self.on_gossip(ev),
            BehaviourEvent::Rr(ev) => self.on_request_response(ev),
            BehaviourEvent::Autonat(ev) => self.on_autonat(ev),
            BehaviourEvent::Dcutr(ev) => self.on_dcutr(ev),
            BehaviourEvent::Relay(ev) => self.on_relay_client(ev),
            _ => {}
        }
    }

    fn on_identify(&mut self, peer: PeerId, info: identify::Info) {
        self.reach_on_identify(peer, &info);
        let has = |p: &str| info.protocols.iter().any(|s| s.as_ref() == p);
        let waterfall = has(WATERFALL_KAD_PROTOCOL);
        let public = self.public && has(PUBLIC_KAD_PROTOCOL);
        for addr in info.listen_addrs.iter().take(MAX_IDENTIFY_ADDRS) {
            let b = self.swarm.behaviour_mut();
            if waterfall {
                b.kad.add_address(&peer, addr.clone());
            }
            if public && let Some(k) = b.public_kad.as_mut() {
                k.add_address(&peer, addr.clone());
            }
        }
        if waterfall && !self.kad_bootstrapped {
            // First DHT peer: look ourselves up so the routing table fills beyond the bootstrap.
            self.kad_bootstrapped = self.swarm.behaviour_mut().kad.bootstrap().is_ok();
        }
        if public {
            self.public_peer_found();
        }
    }

    fn on_kad(&mut self, ev: kad::Event) {
        match ev {
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::PutRecord {
                        source,
                        record: Some(record),
                        ..
                    },
            } => self.on_inbound_put(source, record),
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => match result {
                QueryResult::PutRecord(r) => {
                    if let Some(reply) = self.puts.remove(&id) {
                        let _ = reply.send(r.map(|_| ()).map_err(|e| {
                            debug!(error = %e, "put not acknowledged by any peer");
                            NetError::NotReplicated
                        }));
                    }
                }
                QueryResult::GetRecord(r) => self.on_get_progress(id, r, step.last),
                _ => {}
            },
            _ => {}
        }
    }

    /// Whether this node is among the peers a publisher would store `key` at (see
    /// [`CLOSENESS_MARGIN`]).
    fn close_to(&mut self, key: &RecordKey) -> bool {
        let target = kad::KBucketKey::new(key.clone());
        let local = kad::KBucketKey::from(*self.swarm.local_peer_id());
        let mine = local.distance(&target);
        let closer = self
            .swarm
            .behaviour_mut()
            .kad
            .get_closest_local_peers(&target)
            .take_while(|p| p.distance(&target) < mine)
            .take(CLOSENESS_MARGIN)
            .count();
        closer < CLOSENESS_MARGIN
    }

    fn on_inbound_put(&mut self, source: PeerId, mut record: Record) {
        if !self.close_to(&record.key) {
            debug!(%source, "record for a key this node is not close to, not stored");
            return;
        }
        let key = record.key.to_vec();
        let local = *self.swarm.local_peer_id();
        let store = self.swarm.behaviour_mut().kad.store_mut();
        let stored = store.get(&record.key).map(|r| r.value.clone());
        let now = records::now_unix_ms();
        match records::admit(&self.validator, &key, &record.value, stored.as_deref(), now) {
            Ok(checked) => {
                // Our clock, the signed expiry and the kind's hold time, not the sender's TTL.
                let hold = checked.remaining.min(checked.meta.hold_for);
                record.expires = Some(Instant::now() + hold);
                // Nobody else publishes as us (kad would take it for our own record).
                if record.publisher.is_none_or(|p| p == local) {
                    record.publisher = Some(source);
                }
                if let Err(refusal) = store.put_foreign(record, source, checked.meta.signer) {
                    // Quotas are not misbehaviour: a busy honest peer may reach them.
                    debug!(%source, ?refusal, "record not stored");
                }
            }
            Err(refusal) => {
                debug!(%source, ?refusal, "inbound record refused");
                if refusal.is_misbehaviour() {
                    self.strike(source, "invalid record");
                }
            }
        }
    }

    fn on_get_progress(
        &mut self,
        id: QueryId,
        r: Result<GetRecordOk, kad::GetRecordError>,
        last: bool,
    ) {
        let Some(g) = self.gets.get_mut(&id) else {
            return;
        };
        let mut offender = None;
        match r {
            Ok(GetRecordOk::FoundRecord(peer_record)) => {
                let value = peer_record.record.value;
                match records::check(&self.validator, &g.key, &value, records::now_unix_ms()) {
                    Ok(c) if g.owner.as_ref().is_some_and(|o| *o != c.meta.signer) => {
                        debug!(peer = ?peer_record.peer, "fetched record of another signer dropped");
                    }
                    Ok(c) => {
                        if g.found.len() < MAX_RECORDS_PER_GET
                            && !g.found.iter().any(|(_, v)| *v == value)
                        {
                            g.found.push((c.meta.seq, value));
                        }
                        // Once a valid copy is in hand, wait only briefly for other versions:
                        // the query itself may hang on an unreachable peer until kad's timeout.
                        g.deadline = g.deadline.min(Instant::now() + GET_GRACE);
                    }
                    Err(refusal) => {
                        debug!(peer = ?peer_record.peer, ?refusal, "fetched record refused");
                        if refusal.is_misbehaviour() {
                            offender = peer_record.peer;
                        }
                    }
                }
            }
            Ok(GetRecordOk::FinishedWithNoAdditionalRecord { .. }) | Err(_) => {}
        }
        if last && let Some(g) = self.gets.remove(&id) {
            finish_get(g, Err(NetError::NotFound));
        }
        if let Some(peer) = offender {
            self.strike(peer, "invalid record returned");
        }
    }

    fn on_gossip(&mut self, ev: gossipsub::Event) {
        match ev {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let topic = message.topic.as_str().to_owned();
                let author = message.source.unwrap_or(propagation_source);
                let verdict = (self.gossip_validator)(&topic, &author, &message.data);
                let acceptance = match verdict {
                    GossipVerdict::Accept => gossipsub::MessageAcceptance::Accept,
                    GossipVerdict::Ignore => gossipsub::MessageAcceptance::Ignore,
                    GossipVerdict::Reject => gossipsub::MessageAcceptance::Reject,
                };
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
                match verdict {
                    GossipVerdict::Accept => self.emit(NetEvent::Gossip {
                        topic,
                        from: author,
                        data: message.data,
                    }),
                    // Late or not ours: nobody's fault.
                    GossipVerdict::Ignore => {}
                    // Honest peers forward only what they validated, so the forwarder is at fault.
                    GossipVerdict::Reject => self.strike(propagation_source, "invalid gossip"),
                }
            }
            gossipsub::Event::Subscribed { topic, .. } => {
                self.flush_pending(Some(topic.as_str()));
            }
            _ => {}
        }
    }

    fn on_request_response(&mut self, ev: request_response::Event<Body, Body>) {
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request_id,
                    request,
                    channel,
                } => {
                    let Body::Data(data) = request else {
                        // Dropping the channel makes the request fail at the sender.
                        self.strike(peer, "oversized request");
                        return;
                    };
                    if self.inbound.len() >= MAX_PENDING_INBOUND {
                        debug!(%peer, "too many pending inbound requests, dropping");
                        return;
                    }
                    // Bounded work: at most MAX_PENDING_INBOUND entries.
                    let of_peer = self.inbound.values().filter(|p| p.peer == peer).count();
                    if of_peer >= MAX_PENDING_INBOUND_PER_PEER {
                        debug!(%peer, "too many pending inbound requests of this peer, dropping");
                        return;
                    }
                    let id = self.next_inbound;
                    self.next_inbound += 1;
                    self.inbound.insert(
                        id,
                        PendingInbound {
                            channel,
                            peer,
                            since: Instant::now(),
                        },
                    );
                    self.inbound_ids.insert(request_id, id);
                    let delivered = match self.events.try_reserve() {
                        Ok(permit) => {
                            permit.send(NetEvent::Request {
                                from: peer,
                                data,
                                reply: ResponseHandle {
                                    id,
                                    peer,
                                    cmd: self.cmd_weak.clone(),
                                    done: false,
                                },
                            });
                            true
                        }
                        Err(_) => false,
                    };
                    if !delivered {
                        // The application lags: free the slot now (the request fails at the
                        // requester at once) instead of holding it for INBOUND_TTL.
                        self.inbound.remove(&id);
                        self.inbound_ids.remove(&request_id);
                        self.note_dropped_event();
                    }
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.requests.remove(&request_id) {
                        let r = match response {
                            Body::Data(d) => Ok(d),
                            Body::Oversized => Err(NetError::Request("oversized response".into())),
                        };
                        let _ = reply.send(r);
                    }
                }
            },
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some(reply) = self.requests.remove(&request_id) {
                    let _ = reply.send(Err(NetError::Request(error.to_string())));
                }
            }
            request_response::Event::InboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(id) = self.inbound_ids.remove(&request_id) {
                    self.inbound.remove(&id);
                }
                debug!(%peer, %error, "inbound request failed");
            }
            request_response::Event::ResponseSent { request_id, .. } => {
                self.inbound_ids.remove(&request_id);
            }
        }
    }
}

/// Complete a get: the collected records sorted by descending sequence, else `empty`.
/// For a query that ends later: the caller gets the receiver at once (it does not wait while
/// the actor serves other commands), and the query keeps the sender it answers on.
fn answer_later<T>(reply: oneshot::Sender<oneshot::Receiver<T>>) -> oneshot::Sender<T> {
    let (tx, rx) = oneshot::channel();
    let _ = reply.send(rx);
    tx
}

fn finish_get(mut g: PendingGet, empty: Result<Vec<Vec<u8>>>) {
    let r = if g.found.is_empty() {
        empty
    } else {
        g.found.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        Ok(g.found.into_iter().map(|(_, v)| v).collect())
    };
    let _ = g.reply.send(r);
}

/// An own record held `hold_for` by others is put again at half that, at most every
/// `interval`, at least a second apart.
fn republish_every(hold_for: Duration, interval: Duration) -> Duration {
    (hold_for / 2).min(interval).max(Duration::from_secs(1))
}

/// The peer id in a `/p2p/<id>` suffix, if any.
fn peer_id_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

/// The IP address a multiaddress starts with, if it does (not a DNS name, not a relay path).
fn ip_of(a: &Multiaddr) -> Option<std::net::IpAddr> {
    match a.iter().next()? {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    }
}
