//! Topic and subscription administration shared by gRPC and REST.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use tickwire_proto::futex::realtime_ns;
use tickwire_proto::pb;

use crate::EdgeState;
use crate::dispatch::outbox::Closed;
use crate::dispatch::{SubControl, SubscriptionHandle};
use crate::error::ApiError;
use crate::group::Groups;
use crate::store::{self, Store, StoreError};

/// Runs a blocking engine call (it creates files and waits for shards)
/// off the async threads.
async fn blocking<T: Send + 'static>(
    state: &EdgeState,
    f: impl FnOnce(&dyn crate::Engine) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let engine = state.engine.clone();
    tokio::task::spawn_blocking(move || f(engine.as_ref()))
        .await
        .map_err(ApiError::internal)?
}

fn topic_info(t: &crate::TopicDesc) -> pb::TopicInfo {
    pb::TopicInfo {
        topic: t.name.clone(),
        partitions: t.partitions,
        capacity: t.capacity,
        retention_policy: t.retention_policy(),
        enabled: true,
        origin: if t.runtime { "runtime" } else { "config" }.into(),
    }
}

/// Creates a topic at run time: the engine makes and starts writing its
/// rings, then its row is written (a restart creates it again from there);
/// a row that cannot be written undoes the topic, so none outlives the
/// run unrecorded. Its dispatcher starts at once (latest values).
///
/// # Errors
/// [`ApiError::Invalid`] naming the field; [`ApiError::AlreadyExists`];
/// [`ApiError::Unavailable`].
pub async fn create_topic(
    state: &EdgeState,
    r: pb::CreateTopicRequest,
) -> Result<pb::TopicInfo, ApiError> {
    let retention = if r.retention_policy.is_empty() {
        None
    } else {
        let d = humantime::parse_duration(&r.retention_policy).map_err(|e| {
            ApiError::invalid(
                "retention_policy",
                format!(
                    "{} is not a duration such as 7d: {e}",
                    tickwire_proto::symbology::quoted(&r.retention_policy)
                ),
            )
        })?;
        if d.is_zero() {
            return Err(ApiError::invalid(
                "retention_policy",
                "a retention of zero would delete every segment as it is written",
            ));
        }
        Some(d)
    };
    let store = state.store()?.clone();
    let name = r.topic.clone();
    let capacity = (r.capacity != 0).then_some(r.capacity);
    let desc = blocking(state, move |e| {
        e.create_topic(&name, r.partitions, capacity, retention)
    })
    .await?;
    if let Err(e) = store.record_topic(&desc).await {
        let name = desc.name.clone();
        if let Err(undo) = blocking(state, move |e| e.delete_topic(&name)).await {
            tracing::error!(topic = %desc.name, error = %undo, "a topic whose row could not be written could not be deleted again");
        }
        return Err(e.into());
    }
    if let Err(e) = state.hub.topic(&desc.name) {
        tracing::warn!(topic = %desc.name, error = %e, "no dispatcher for the new topic yet");
    }
    Ok(topic_info(&desc))
}

/// Grows a topic's partitions (never shrinks them), then its row.
///
/// # Errors
/// [`ApiError::Invalid`]; [`ApiError::NotFound`]; [`ApiError::Unavailable`]
/// (the row could not be written: the topic has grown all the same and a
/// restart keeps it, counting its rings on disk).
pub async fn grow_topic(
    state: &EdgeState,
    topic: &str,
    partitions: u32,
) -> Result<pb::TopicInfo, ApiError> {
    let store = state.store()?.clone();
    let name = topic.to_string();
    let desc = blocking(state, move |e| e.grow_topic(&name, partitions)).await?;
    store.record_topic(&desc).await?;
    Ok(topic_info(&desc))
}

/// Deletes a topic: refused while a routing rule (on or off) routes to it;
/// named subscriptions on it are deleted; its live streams are told and
/// ended by their dispatcher when the rings go.
///
/// # Errors
/// [`ApiError::NotFound`]; [`ApiError::Conflict`].
pub async fn delete_topic(state: &EdgeState, topic: &str) -> Result<(), ApiError> {
    let store = state.store()?.clone();
    let _rules = state.rules_lock.lock().await;
    if let Some(r) = store
        .rules()
        .await?
        .into_iter()
        .find(|r| r.target_topic == topic)
    {
        return Err(ApiError::Conflict(format!(
            "routing rule {:?} routes to topic {topic}: delete or change the rule first",
            r.rule_name
        )));
    }
    let name = topic.to_string();
    blocking(state, move |e| e.delete_topic(&name)).await?;
    store.disable_topic(topic).await?;
    for name in state.subscriptions.names(topic) {
        if let Err(e) = state.subscriptions.delete(state, topic, &name).await {
            tracing::warn!(topic, subscription = %name, error = %e, "a deleted topic's subscription could not be deleted");
        }
    }
    state.hub.forget(topic);
    Ok(())
}

/// The node's topics.
pub fn list_topics(state: &EdgeState) -> Vec<pb::TopicInfo> {
    state.engine.topics().iter().map(topic_info).collect()
}

fn quantiles(h: &hdrhistogram::Histogram<u64>) -> pb::LatencyQuantiles {
    let us = |v: u64| v as f64 / 1000.0;
    pb::LatencyQuantiles {
        p50_us: us(h.value_at_quantile(0.5)),
        p99_us: us(h.value_at_quantile(0.99)),
        p999_us: us(h.value_at_quantile(0.999)),
        max_us: us(h.max()),
    }
}

/// One topic's stats.
///
/// # Errors
/// [`ApiError::NotFound`] for a topic this node does not have.
pub fn topic_stats(state: &EdgeState, topic: &str) -> Result<pb::TopicStats, ApiError> {
    let desc = state
        .engine
        .topics()
        .into_iter()
        .find(|t| t.name == topic)
        .ok_or_else(|| ApiError::NotFound {
            what: "topic",
            name: topic.into(),
        })?;
    let t = state.hub.topic(topic)?;
    let events = t.events.load(Ordering::Relaxed);
    let rate = {
        let mut last = state.rates.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let (then, before) = last
            .insert(topic.to_string(), (now, events))
            .unwrap_or((state.started, 0));
        let secs = now.duration_since(then).as_secs_f64();
        if secs > 0.0 {
            events.saturating_sub(before) as f64 / secs
        } else {
            0.0
        }
    };
    let latency = t
        .dispatch_latency
        .lock()
        .map(|h| quantiles(&h))
        .unwrap_or_default();
    Ok(pb::TopicStats {
        topic: topic.into(),
        partitions: desc.partitions,
        events,
        bytes: events * tickwire_proto::frame::SLOT_SIZE as u64,
        events_per_sec: rate,
        subscribers: t.subscribers.load(Ordering::Relaxed) as u32,
        latency: Some(latency),
        delivered: t.delivered.load(Ordering::Relaxed),
        dropped: t.dropped.load(Ordering::Relaxed),
    })
}

struct Named {
    id: String,
    request: pb::SubscriptionRequest,
    status: pb::SubscriptionStatus,
    created_at_ns: u64,
    streams: Vec<SubControl>,
    last_rate: (std::time::Instant, u64),
}

/// Subscriptions created with `ManageSubscription` / the admin API; live
/// streams naming one attach to it (its stats count them, pausing pauses
/// them). Every change is written to the command-side store first, then
/// applied: a restart finds them as they were (see [`Subscriptions::load`]).
#[derive(Default)]
pub struct Subscriptions {
    named: Mutex<HashMap<(String, String), Named>>,
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Exists { what, name } => ApiError::AlreadyExists { what, name },
            other => {
                tracing::error!(error = %other, "command store");
                ApiError::Unavailable("the command store cannot be written now".into())
            }
        }
    }
}

/// The spec's name of a subscription type.
fn type_name(t: i32) -> &'static str {
    match pb::SubscriptionType::try_from(t) {
        Ok(pb::SubscriptionType::Shared) => "Shared",
        Ok(pb::SubscriptionType::Failover) => "Failover",
        Ok(pb::SubscriptionType::KeyShared) => "KeyShared",
        _ => "Exclusive",
    }
}

/// The spec's name of a start position.
fn position_name(p: i32) -> &'static str {
    match pb::MessagePosition::try_from(p) {
        Ok(pb::MessagePosition::Earliest) => "Earliest",
        Ok(pb::MessagePosition::MessageId) => "MessageId",
        _ => "Latest",
    }
}

fn status_name(s: pb::SubscriptionStatus) -> &'static str {
    match s {
        pb::SubscriptionStatus::Paused => "paused",
        pb::SubscriptionStatus::Error => "error",
        pb::SubscriptionStatus::Stopped => "stopped",
        pb::SubscriptionStatus::Active => "active",
    }
}

/// What a stored subscription needs to be served again, as the `filters`
/// JSON of its row.
fn request_json(r: &pb::SubscriptionRequest) -> String {
    let f = r.filters.clone().unwrap_or_default();
    serde_json::json!({
        "symbols": r.symbols,
        "data_types": r.data_types,
        "exchanges": f.exchanges,
        "currencies": f.currencies,
        "min_price": f.min_price,
        "max_price": f.max_price,
        "min_volume": f.min_volume,
        "type": r.r#type,
        "start_position": r.start_position,
        "policy": r.policy,
        "delivery_mode": r.delivery_mode,
    })
    .to_string()
}

/// The request a stored row was created with.
fn request_from_row(row: &store::SubscriptionRow) -> Result<pb::SubscriptionRequest, String> {
    let v: serde_json::Value =
        serde_json::from_str(&row.filters).map_err(|e| format!("filters: {e}"))?;
    let strings = |k: &str| -> Vec<String> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let int = |k: &str| v[k].as_i64().unwrap_or(0) as i32;
    Ok(pb::SubscriptionRequest {
        topic: row.topic_name.clone(),
        subscription: row.subscription_name.clone(),
        r#type: int("type"),
        filters: Some(pb::FilterCriteria {
            exchanges: strings("exchanges"),
            currencies: strings("currencies"),
            min_price: v["min_price"].as_f64(),
            max_price: v["max_price"].as_f64(),
            min_volume: v["min_volume"].as_i64(),
        }),
        start_position: int("start_position"),
        action: pb::SubscriptionAction::Create as i32,
        symbols: strings("symbols"),
        data_types: strings("data_types"),
        policy: int("policy"),
        delivery_mode: int("delivery_mode"),
        ..Default::default()
    })
}

impl Subscriptions {
    /// Takes the subscriptions the store holds (at start, once).
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn load(&self, store: &Store) -> Result<usize, StoreError> {
        let rows = store.subscriptions().await?;
        let mut all = self.lock();
        let mut n = 0;
        for row in rows {
            let request = match request_from_row(&row) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(subscription = %row.subscription_id, error = %e, "stored subscription unreadable; skipped");
                    continue;
                }
            };
            let status = match row.status.as_str() {
                "paused" => pb::SubscriptionStatus::Paused,
                "error" => pb::SubscriptionStatus::Error,
                "stopped" => pb::SubscriptionStatus::Stopped,
                _ => pb::SubscriptionStatus::Active,
            };
            let created_at_ns = humantime::parse_rfc3339(&row.created_at)
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as u64);
            all.insert(
                (row.topic_name.clone(), row.subscription_name.clone()),
                Named {
                    id: row.subscription_id.clone(),
                    request,
                    status,
                    created_at_ns,
                    streams: Vec::new(),
                    last_rate: (std::time::Instant::now(), 0),
                },
            );
            n += 1;
        }
        Ok(n)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Named>> {
        self.named.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches a new stream to the named subscription, if there is one.
    pub fn attach(&self, name: &str, sub: &SubscriptionHandle) {
        if name.is_empty() {
            return;
        }
        let mut all = self.lock();
        if let Some(n) = all.get_mut(&(sub.topic.clone(), name.to_string())) {
            n.streams.retain(SubControl::alive);
            let c = sub.control();
            if n.status == pb::SubscriptionStatus::Paused {
                c.set_paused(true);
            }
            n.streams.push(c);
        }
    }

    /// Creates, pauses, resumes, deletes or reports a subscription.
    ///
    /// # Errors
    /// Invalid fields; an unknown subscription; one that exists already.
    pub async fn manage(
        &self,
        state: &EdgeState,
        mut r: pb::SubscriptionRequest,
    ) -> Result<pb::SubscriptionResponse, ApiError> {
        r.topic = state.topic_or_default(&r.topic);
        if r.subscription.is_empty() || r.subscription.len() > 100 {
            return Err(ApiError::invalid(
                "subscription",
                "a name of 1 to 100 bytes is required",
            ));
        }
        let action = pb::SubscriptionAction::try_from(r.action)
            .map_err(|_| ApiError::invalid("action", format!("{} is not an action", r.action)))?;
        let key = (r.topic.clone(), r.subscription.clone());
        if action == pb::SubscriptionAction::Create {
            // Validate it the way a stream would be.
            let as_stream = pb::StreamRequest {
                symbols: r.symbols.clone(),
                data_types: r.data_types.clone(),
                subscription_name: r.subscription.clone(),
                filters: r.filters.clone(),
                topic: r.topic.clone(),
                start_position: r.start_position,
                policy: r.policy,
                subscription_type: r.r#type,
                delivery_mode: r.delivery_mode,
                ..Default::default()
            };
            crate::spec::SubscriptionSpec::from_request(
                &as_stream,
                &state.default_topic,
                &state.limits,
            )?;
            if !state.engine.topics().iter().any(|t| t.name == r.topic) {
                return Err(ApiError::NotFound {
                    what: "topic",
                    name: r.topic.clone(),
                });
            }
            if self.lock().contains_key(&key) {
                return Err(ApiError::AlreadyExists {
                    what: "subscription",
                    name: r.subscription.clone(),
                });
            }
            let id = format!("{}/{}", r.topic, r.subscription);
            // One instant for the row and the memory: a restart reports the
            // same creation time.
            let now_ns = realtime_ns();
            let now = tickwire_proto::json::rfc3339(now_ns);
            state
                .store()?
                .insert_subscription(&store::SubscriptionRow {
                    subscription_id: id.clone(),
                    topic_name: r.topic.clone(),
                    subscription_name: r.subscription.clone(),
                    subscription_type: type_name(r.r#type).into(),
                    consumer_group: None,
                    filters: request_json(&r),
                    start_position: position_name(r.start_position).into(),
                    status: "active".into(),
                    created_at: now.clone(),
                    last_activity: now,
                })
                .await?;
            if r.delivery_mode != pb::DeliveryMode::AtMostOnce as i32
                && r.start_position == pb::MessagePosition::Latest as i32
            {
                // Durable from now: what is published after this call waits
                // for the first consumer, as in Pulsar.
                let positions = shm_client::Subscriber::builder(r.topic.clone())
                    .node_dir(state.engine.node_dir())
                    .ring_only()
                    .open()
                    .map(|s| s.positions())
                    .unwrap_or_default();
                state.store()?.save_cursors(&id, &positions).await?;
            }
            let mut all = self.lock();
            all.insert(
                key.clone(),
                Named {
                    id,
                    request: r,
                    status: pb::SubscriptionStatus::Active,
                    created_at_ns: now_ns,
                    streams: Vec::new(),
                    last_rate: (std::time::Instant::now(), 0),
                },
            );
        } else if action == pb::SubscriptionAction::Reset {
            return self.reset(state, r).await;
        } else if action == pb::SubscriptionAction::Delete {
            self.delete(state, &key.0, &key.1).await?;
            return Ok(pb::SubscriptionResponse {
                subscription_id: format!("{}/{}", key.0, key.1),
                status: pb::SubscriptionStatus::Stopped as i32,
                stats: None,
                message: "deleted".into(),
            });
        } else if matches!(
            action,
            pb::SubscriptionAction::Pause | pb::SubscriptionAction::Resume
        ) {
            let paused = action == pb::SubscriptionAction::Pause;
            let status = if paused {
                pb::SubscriptionStatus::Paused
            } else {
                pb::SubscriptionStatus::Active
            };
            let id =
                self.lock()
                    .get(&key)
                    .map(|n| n.id.clone())
                    .ok_or_else(|| ApiError::NotFound {
                        what: "subscription",
                        name: key.1.clone(),
                    })?;
            state
                .store()?
                .set_subscription_status(&id, status_name(status))
                .await?;
            let mut all = self.lock();
            let n = all.get_mut(&key).ok_or_else(|| ApiError::NotFound {
                what: "subscription",
                name: key.1.clone(),
            })?;
            n.status = status;
            n.streams.retain(SubControl::alive);
            for s in &n.streams {
                s.set_paused(paused);
            }
            state.groups.set_paused(&key.0, &key.1, paused);
        }
        let stats = self.stats(&state.groups, &key.0, &key.1)?;
        Ok(pb::SubscriptionResponse {
            subscription_id: stats.subscription_id.clone(),
            status: stats.status,
            message: action
                .as_str_name()
                .trim_start_matches("SUBSCRIPTION_ACTION_")
                .to_lowercase(),
            stats: Some(stats),
        })
    }

    /// Moves an at-least-once group's cursor (RESET): its consumers are
    /// ended and resume at the new cursor when they join again; no group
    /// starts from the old one meanwhile.
    ///
    /// # Errors
    /// [`ApiError::NotFound`] for a subscription with no group (running,
    /// named or with stored cursors); [`ApiError::Invalid`] for an
    /// at-most-once one, or a position without what it needs.
    async fn reset(
        &self,
        state: &EdgeState,
        r: pb::SubscriptionRequest,
    ) -> Result<pb::SubscriptionResponse, ApiError> {
        let (topic, name) = (r.topic.clone(), r.subscription.clone());
        let id = crate::group::subscription_id(&topic, &name);
        let store = state.store()?;
        let named = self
            .lock()
            .get(&(topic.clone(), name.clone()))
            .map(|n| n.request.delivery_mode);
        if named == Some(pb::DeliveryMode::AtMostOnce as i32) {
            return Err(ApiError::invalid(
                "action",
                format!("subscription {name} is AT_MOST_ONCE: it keeps no cursor to reset"),
            ));
        }
        let mut cursors: std::collections::BTreeMap<u32, u64> =
            store.cursors(&id).await?.into_iter().collect();
        let running = state.groups.get(&topic, &name);
        if named.is_none() && running.is_none() && cursors.is_empty() {
            return Err(ApiError::NotFound {
                what: "subscription",
                name,
            });
        }
        if let Some(g) = &running {
            let snap = g
                .snapshot
                .lock()
                .map(|s| s.cursors.clone())
                .unwrap_or_default();
            for (p, c) in snap {
                cursors.entry(p).or_insert(c);
            }
        }
        let node_dir = state.engine.node_dir();
        let probe = |start: shm_client::Start, ring_only: bool| {
            let mut b = shm_client::Subscriber::builder(topic.clone())
                .node_dir(&node_dir)
                .start(start);
            if ring_only {
                b = b.ring_only();
            }
            b.open()
                .map(|s| s.positions())
                .map_err(|e| ApiError::Unavailable(format!("topic {topic}: {e}")))
        };
        let position = pb::MessagePosition::try_from(r.start_position).map_err(|_| {
            ApiError::invalid(
                "start_position",
                format!("{} is not a position", r.start_position),
            )
        })?;
        let what = match position {
            pb::MessagePosition::Earliest => {
                cursors.extend(probe(shm_client::Start::Earliest, false)?);
                "the earliest event kept".to_string()
            }
            pb::MessagePosition::Latest => {
                cursors.extend(probe(shm_client::Start::Latest, true)?);
                "latest".to_string()
            }
            pb::MessagePosition::Timestamp => {
                if r.start_time_ns == 0 {
                    return Err(ApiError::invalid(
                        "start_time_ns",
                        "a reset to TIMESTAMP needs start_time_ns (UTC nanoseconds)",
                    ));
                }
                cursors.extend(probe(shm_client::Start::Time(r.start_time_ns), false)?);
                format!("time {}", tickwire_proto::json::rfc3339(r.start_time_ns))
            }
            pb::MessagePosition::MessageId => {
                if r.start_message_ids.is_empty() {
                    return Err(ApiError::invalid(
                        "start_message_ids",
                        "a reset to MESSAGE_ID needs at least one message id",
                    ));
                }
                let partitions = state
                    .engine
                    .topics()
                    .iter()
                    .find(|t| t.name == topic)
                    .map_or(0, |t| t.partitions);
                for (i, m) in r.start_message_ids.iter().enumerate() {
                    if m.partition >= partitions {
                        return Err(ApiError::invalid(
                            format!("start_message_ids[{i}].partition"),
                            format!("topic {topic} has {partitions} partitions"),
                        ));
                    }
                    cursors.insert(m.partition, m.sequence.saturating_add(1).max(1));
                }
                "the given message ids".to_string()
            }
        };
        let cursors: Vec<(u32, u64)> = cursors.into_iter().collect();
        {
            let _creating = state.groups.creating().await;
            state
                .groups
                .stop(
                    &topic,
                    &name,
                    Closed::Removed(format!(
                        "the cursor of subscription {name} was reset to {what}: join again to resume there"
                    )),
                )
                .await;
            store.save_cursors(&id, &cursors).await?;
        }
        tracing::info!(subscription = %id, to = %what, ?cursors, "subscription cursor reset");
        let stats = self.stats(&state.groups, &topic, &name).ok();
        Ok(pb::SubscriptionResponse {
            subscription_id: id,
            status: stats
                .as_ref()
                .map_or(pb::SubscriptionStatus::Active as i32, |s| s.status),
            message: format!("reset to {what}"),
            stats,
        })
    }

    /// Deletes a subscription; its live streams end with "subscription deleted".
    ///
    /// # Errors
    /// [`ApiError::NotFound`].
    pub async fn delete(&self, state: &EdgeState, topic: &str, name: &str) -> Result<(), ApiError> {
        let key = (topic.to_string(), name.to_string());
        let id = crate::group::subscription_id(topic, name);
        let named = self.lock().contains_key(&key);
        // A group its consumers started has no row, only cursors.
        if !named
            && state.groups.get(topic, name).is_none()
            && state.store()?.cursors(&id).await?.is_empty()
        {
            return Err(ApiError::NotFound {
                what: "subscription",
                name: name.into(),
            });
        }
        if named {
            state.store()?.delete_subscription(&id).await?;
        }
        state.groups.close(topic, name, Closed::Deleted);
        state.store()?.delete_cursors(&id).await?;
        let Some(n) = self.lock().remove(&key) else {
            // Deleted by a concurrent request meanwhile.
            return Ok(());
        };
        for s in n.streams {
            if let Some(o) = s.outbox.upgrade() {
                o.close(Closed::Deleted);
            }
        }
        Ok(())
    }

    /// Names of the subscriptions on a topic.
    pub fn names(&self, topic: &str) -> Vec<String> {
        self.lock()
            .keys()
            .filter(|(t, _)| t == topic)
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// A subscription's stats, summed over its live streams.
    ///
    /// # Errors
    /// [`ApiError::NotFound`].
    pub fn stats(
        &self,
        groups: &Groups,
        topic: &str,
        name: &str,
    ) -> Result<pb::SubscriptionStats, ApiError> {
        let group = groups.get(topic, name);
        let mut all = self.lock();
        let Some(n) = all.get_mut(&(topic.to_string(), name.to_string())) else {
            // A group its consumers started without ManageSubscription.
            let g = group.ok_or_else(|| ApiError::NotFound {
                what: "subscription",
                name: name.into(),
            })?;
            let mut s = pb::SubscriptionStats {
                subscription_id: crate::group::subscription_id(topic, name),
                topic: topic.into(),
                subscription: name.into(),
                created_at_ns: g.started_ns as i64,
                ..Default::default()
            };
            group_stats(&mut s, &g);
            return Ok(s);
        };
        n.streams.retain(SubControl::alive);
        let mut s = pb::SubscriptionStats {
            subscription_id: n.id.clone(),
            topic: topic.into(),
            subscription: name.into(),
            status: n.status as i32,
            connections: n.streams.len() as u32,
            created_at_ns: n.created_at_ns as i64,
            ..Default::default()
        };
        for c in &n.streams {
            let Some(o) = c.outbox.upgrade() else {
                continue;
            };
            let k = &o.counters;
            s.delivered += k.delivered.load(Ordering::Relaxed);
            s.dropped += k.dropped.load(Ordering::Relaxed);
            s.gaps += k.gaps.load(Ordering::Relaxed);
            s.conflated += k.conflated.load(Ordering::Relaxed);
            s.lag += o.depth().0 as u64;
            s.last_activity_ns = s
                .last_activity_ns
                .max(k.last_activity_ns.load(Ordering::Relaxed) as i64);
        }
        let now = std::time::Instant::now();
        let secs = now.duration_since(n.last_rate.0).as_secs_f64();
        if secs > 0.0 {
            s.rate_per_sec = s.delivered.saturating_sub(n.last_rate.1) as f64 / secs;
        }
        n.last_rate = (now, s.delivered);
        match group {
            Some(g) => group_stats(&mut s, &g),
            None => {
                s.subscription_type = type_name(n.request.r#type).into();
                s.delivery_mode = pb::DeliveryMode::try_from(n.request.delivery_mode)
                    .map_or("AT_MOST_ONCE", |m| {
                        m.as_str_name().trim_start_matches("DELIVERY_MODE_")
                    })
                    .into();
            }
        }
        Ok(s)
    }

    /// Every subscription's stats (those created through the API, and
    /// groups their consumers started).
    pub fn all(&self, groups: &Groups) -> Vec<pb::SubscriptionStats> {
        let mut keys: Vec<(String, String)> = self.lock().keys().cloned().collect();
        for g in groups.all() {
            let k = (g.topic.clone(), g.name.clone());
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        keys.into_iter()
            .filter_map(|(t, n)| self.stats(groups, &t, &n).ok())
            .collect()
    }
}

/// Adds a running group's figures to a subscription's stats.
fn group_stats(s: &mut pb::SubscriptionStats, g: &crate::group::GroupShared) {
    let snap = g.snapshot.lock().unwrap_or_else(|p| p.into_inner()).clone();
    s.subscription_type = g.kind.name().into();
    s.delivery_mode = if g.acked {
        "AT_LEAST_ONCE"
    } else {
        "AT_MOST_ONCE"
    }
    .into();
    s.connections += snap.members.len() as u32;
    s.delivered += snap.counters.delivered;
    s.gaps += u64::from(snap.lost > 0);
    s.dropped += snap.lost;
    s.unacked = snap.unacked as u64;
    s.redelivered = snap.counters.redelivered;
    s.acked = snap.counters.acked;
    s.dead_lettered = snap.counters.dead_lettered;
    s.backlog = snap.ready as u64;
    s.lag += (snap.ready + snap.unacked) as u64;
    if snap.paused {
        s.status = pb::SubscriptionStatus::Paused as i32;
    }
    s.cursors = snap
        .cursors
        .iter()
        .map(|&(p, next)| pb::MessageId {
            partition: p,
            epoch: 0,
            sequence: next,
        })
        .collect();
    s.consumers = snap
        .members
        .iter()
        .map(|m| pb::ConsumerStats {
            consumer_name: m.name.clone(),
            priority_level: m.priority,
            unacked: m.unacked,
            receiver_queue_size: m.window,
            hash_slots: m.slots,
            active_partitions: m.partitions.clone(),
            draining: m.draining,
            delivered: m.delivered,
            acked: m.acked,
        })
        .collect();
}

/// The rules that compile on their own: a stored rule whose topic is gone
/// stays in the store and is left out, with a warning naming it.
fn usable(state: &EdgeState, rules: Vec<crate::RoutingRule>) -> Vec<crate::RoutingRule> {
    rules
        .into_iter()
        .filter(|r| {
            match state
                .engine
                .set_routing_rules(std::slice::from_ref(r), true)
            {
                Ok(()) => true,
                Err((field, why)) => {
                    tracing::warn!(rule = %r.rule_name, %field, %why, "routing rule left out");
                    false
                }
            }
        })
        .collect()
}

/// The rules, highest priority first.
///
/// # Errors
/// The store cannot be read.
pub async fn list_rules(state: &EdgeState) -> Result<Vec<crate::RoutingRule>, ApiError> {
    Ok(state.store()?.rules().await?)
}

/// Creates (`replace` false) or replaces a routing rule: checked by the
/// engine first (a bad field is a 400 naming it), then stored, then the
/// whole set applied to the router at once. `may_change` is asked about
/// the rule being replaced (the caller's rights on its topic), under the
/// same lock.
///
/// # Errors
/// Invalid fields; a taken name (create) or an unknown one (replace); what
/// `may_change` says; the store cannot be written.
pub async fn put_rule(
    state: &EdgeState,
    mut rule: crate::RoutingRule,
    replace: bool,
    may_change: impl Fn(&crate::RoutingRule) -> Result<(), ApiError>,
) -> Result<crate::RoutingRule, ApiError> {
    let _one = state.rules_lock.lock().await;
    state
        .engine
        .set_routing_rules(std::slice::from_ref(&rule), true)
        .map_err(|(field, why)| {
            let field = field
                .strip_prefix("rules[0].")
                .map_or(field.clone(), str::to_string);
            ApiError::invalid(field, why)
        })?;
    let store = state.store()?;
    let mut all = store.rules().await?;
    let existing = all.iter().position(|r| r.rule_name == rule.rule_name);
    match (existing, replace) {
        (Some(_), false) => {
            return Err(ApiError::AlreadyExists {
                what: "routing rule",
                name: rule.rule_name,
            });
        }
        (None, true) => {
            return Err(ApiError::NotFound {
                what: "routing rule",
                name: rule.rule_name,
            });
        }
        (Some(i), true) => {
            may_change(&all[i])?;
            rule.created_at = all[i].created_at.clone();
            all[i] = rule.clone();
        }
        (None, false) => {
            rule.created_at = tickwire_proto::json::rfc3339(realtime_ns());
            all.push(rule.clone());
        }
    }
    store.put_rule(&rule, replace).await?;
    apply_rules(state, all);
    Ok(rule)
}

/// Deletes a routing rule (once `may_change` allows it) and applies the
/// rest at once.
///
/// # Errors
/// [`ApiError::NotFound`]; what `may_change` says; the store cannot be
/// written.
pub async fn delete_rule(
    state: &EdgeState,
    name: &str,
    may_change: impl Fn(&crate::RoutingRule) -> Result<(), ApiError>,
) -> Result<(), ApiError> {
    let _one = state.rules_lock.lock().await;
    let store = state.store()?;
    let mut all = store.rules().await?;
    let i = all
        .iter()
        .position(|r| r.rule_name == name)
        .ok_or_else(|| ApiError::NotFound {
            what: "routing rule",
            name: name.into(),
        })?;
    may_change(&all[i])?;
    store.delete_rule(name).await?;
    all.remove(i);
    apply_rules(state, all);
    Ok(())
}

/// Applies every usable rule of `all` at once; how many.
pub(crate) fn apply_rules(state: &EdgeState, all: Vec<crate::RoutingRule>) -> usize {
    let rules = usable(state, all);
    if let Err((field, why)) = state.engine.set_routing_rules(&rules, false) {
        // Each rule compiled alone: a set cannot fail. Said if it does.
        tracing::error!(%field, %why, "routing rules not applied");
        return 0;
    }
    rules.len()
}
