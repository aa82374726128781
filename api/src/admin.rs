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

/// Creating topics at run time is not in this build.
pub fn create_topic_unsupported(topic: &str) -> ApiError {
    ApiError::Unimplemented(format!(
        "cannot create topic {topic:?} at run time in this build: add a [[topics]] table to the configuration and restart"
    ))
}

/// Deleting topics at run time is not in this build.
pub fn delete_topic_unsupported(topic: &str) -> ApiError {
    ApiError::Unimplemented(format!(
        "cannot delete topic {topic:?} at run time in this build: remove it from the configuration, stop the broker and remove its ring files"
    ))
}

/// The node's topics.
pub fn list_topics(state: &EdgeState) -> Vec<pb::TopicInfo> {
    state
        .engine
        .topics()
        .into_iter()
        .map(|t| pb::TopicInfo {
            topic: t.name,
            partitions: t.partitions,
            capacity: t.capacity,
            retention_policy: "ring".into(),
            enabled: true,
            origin: "config".into(),
        })
        .collect()
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
/// them). Kept in memory by this build: a restart forgets them.
#[derive(Default)]
pub struct Subscriptions {
    named: Mutex<HashMap<(String, String), Named>>,
}

impl Subscriptions {
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
    pub fn manage(
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
            let mut all = self.lock();
            if all.contains_key(&key) {
                return Err(ApiError::AlreadyExists {
                    what: "subscription",
                    name: r.subscription.clone(),
                });
            }
            let id = format!("{}/{}", r.topic, r.subscription);
            all.insert(
                key.clone(),
                Named {
                    id,
                    request: r,
                    status: pb::SubscriptionStatus::Active,
                    created_at_ns: realtime_ns(),
                    streams: Vec::new(),
                    last_rate: (std::time::Instant::now(), 0),
                },
            );
        } else if action == pb::SubscriptionAction::Delete {
            self.delete(&key.0, &key.1)?;
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
            let mut all = self.lock();
            let n = all.get_mut(&key).ok_or_else(|| ApiError::NotFound {
                what: "subscription",
                name: key.1.clone(),
            })?;
            n.status = if paused {
                pb::SubscriptionStatus::Paused
            } else {
                pb::SubscriptionStatus::Active
            };
            n.streams.retain(SubControl::alive);
            for s in &n.streams {
                s.set_paused(paused);
            }
        }
        let stats = self.stats(&key.0, &key.1)?;
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

    /// Deletes a subscription; its live streams end with "subscription deleted".
    ///
    /// # Errors
    /// [`ApiError::NotFound`].
    pub fn delete(&self, topic: &str, name: &str) -> Result<(), ApiError> {
        let n = self
            .lock()
            .remove(&(topic.to_string(), name.to_string()))
            .ok_or_else(|| ApiError::NotFound {
                what: "subscription",
                name: name.into(),
            })?;
        for s in n.streams {
            if let Some(o) = s.outbox.upgrade() {
                o.close(Closed::Deleted);
            }
        }
        Ok(())
    }

    /// A subscription's stats, summed over its live streams.
    ///
    /// # Errors
    /// [`ApiError::NotFound`].
    pub fn stats(&self, topic: &str, name: &str) -> Result<pb::SubscriptionStats, ApiError> {
        let mut all = self.lock();
        let n = all
            .get_mut(&(topic.to_string(), name.to_string()))
            .ok_or_else(|| ApiError::NotFound {
                what: "subscription",
                name: name.into(),
            })?;
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
        let _ = &n.request;
        Ok(s)
    }

    /// Every subscription's stats.
    pub fn all(&self) -> Vec<pb::SubscriptionStats> {
        let keys: Vec<(String, String)> = self.lock().keys().cloned().collect();
        keys.into_iter()
            .filter_map(|(t, n)| self.stats(&t, &n).ok())
            .collect()
    }
}
