//! gRPC: `MarketDataStream` (live streams of pre-encoded batches,
//! `ManageSubscription`) and `TopicManager`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::Stream;
use tickwire_proto::grpc::{Encoded, notice};
use tickwire_proto::pb;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::EdgeState;
use crate::auth::Right;
use crate::dispatch::TopicShared;
use crate::dispatch::outbox::{Closed, Next, Outbox};
use crate::dispatch::{SubscriptionHandle, Wire};
use crate::error::ApiError;
use crate::spec::SubscriptionSpec;

/// Checks the request's API key, then `right` on the topic it names (the
/// default topic when it names none): the message and that topic.
fn admit<T>(
    state: &EdgeState,
    request: Request<T>,
    topic: impl Fn(&T) -> &str,
    right: Right,
) -> Result<(T, String), Status> {
    let key = state.auth.check_grpc(&request)?;
    let r = request.into_inner();
    let topic = state.topic_or_default(topic(&r));
    state.auth.allow(key.as_deref(), &topic, right)?;
    Ok((r, topic))
}

/// A change to a topic names it: the default topic is never implied.
fn named(topic: &str) -> Result<(), Status> {
    if topic.is_empty() {
        return Err(ApiError::invalid("topic", "required: name the topic to change").into());
    }
    Ok(())
}

/// A stream's place under `edge.max_streams`, held as long as it lives.
fn stream_permit(state: &EdgeState) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    state.streams.clone().try_acquire_owned().map_err(|_| {
        ApiError::Limit(format!(
            "{} streams are open; the limit is {}",
            state.config.max_streams, state.config.max_streams
        ))
    })
}

/// The `MarketDataStream` service.
pub struct StreamService {
    state: Arc<EdgeState>,
}

impl StreamService {
    /// Over the edge's state.
    pub fn new(state: Arc<EdgeState>) -> StreamService {
        StreamService { state }
    }
}

type EncodedStream = Pin<Box<dyn Stream<Item = Result<Encoded, Status>> + Send>>;

/// The frames of one subscription as a response stream: heartbeats when
/// idle; the end notice and a status when the dispatcher closes it.
/// Dropping the stream (the client went away) unsubscribes.
fn frames(sub: SubscriptionHandle, heartbeat: std::time::Duration) -> EncodedStream {
    let (outbox, shared) = (sub.outbox.clone(), sub.shared.clone());
    outbox_frames(outbox, Some(shared), sub, heartbeat)
}

/// The frames of an outbox as a response stream; `hold` (the
/// subscription or group membership) lives as long as the stream, and
/// `shared` counts what is sent.
pub(crate) fn outbox_frames<H: Send + 'static>(
    outbox: Arc<Outbox>,
    shared: Option<Arc<TopicShared>>,
    hold: H,
    heartbeat: std::time::Duration,
) -> EncodedStream {
    Box::pin(futures::stream::unfold(
        (outbox, shared, hold, false),
        move |(outbox, shared, hold, done)| async move {
            if done {
                return None;
            }
            match outbox.next(heartbeat).await {
                Next::Frame(f) => {
                    let bytes = if f.events > 0 {
                        merge_queued(&outbox, f.bytes.into_bytes())
                    } else {
                        f.bytes.into_bytes()
                    };
                    if let Some(s) = &shared {
                        s.record_send(f.oldest_ingest_ns, bytes.len());
                    }
                    Some((Ok(Encoded(bytes)), (outbox, shared, hold, false)))
                }
                Next::Idle => Some((
                    Ok(notice::heartbeat(tickwire_proto::futex::realtime_ns())),
                    (outbox, shared, hold, false),
                )),
                Next::Closed(why) => {
                    let status = match &why {
                        Closed::SlowConsumer(_) => Status::resource_exhausted(why.reason()),
                        Closed::TopicGone(_) | Closed::Deleted => Status::not_found(why.reason()),
                        Closed::Shutdown => Status::unavailable(why.reason()),
                        Closed::Removed(_) => Status::aborted(why.reason()),
                    };
                    Some((Err(status), (outbox, shared, hold, true)))
                }
            }
        },
    ))
}

/// The largest response a writer builds by merging queued batches.
const MERGE_MAX: usize = 256 * 1024;

/// Appends the data frames queued behind `first` (up to [`MERGE_MAX`]
/// bytes, stopping at a notice) to it: one `StreamResponse` instead of
/// several. A protobuf embedded message that occurs twice is merged and a
/// repeated field concatenates, so the bytes of two `StreamResponse{batch}`
/// back to back decode as one batch holding both, in order. A writer that
/// keeps up finds nothing queued and sends `first` as it is; one that is
/// behind sends fewer, larger messages.
fn merge_queued(outbox: &Outbox, first: bytes::Bytes) -> bytes::Bytes {
    let Some(next) = outbox.pop_data(MERGE_MAX.saturating_sub(first.len())) else {
        return first;
    };
    let mut out = bytes::BytesMut::with_capacity(first.len() + next.bytes.len() * 2);
    out.extend_from_slice(&first);
    out.extend_from_slice(next.bytes.as_ref());
    while let Some(f) = outbox.pop_data(MERGE_MAX.saturating_sub(out.len())) {
        out.extend_from_slice(f.bytes.as_ref());
    }
    out.freeze()
}

#[tonic::async_trait]
impl pb::raw::market_data_stream_server::MarketDataStream for StreamService {
    type StreamMarketDataStream = EncodedStream;
    type StreamHistoricalDataStream = EncodedStream;

    async fn stream_market_data(
        &self,
        request: Request<pb::StreamRequest>,
    ) -> Result<Response<EncodedStream>, Status> {
        let key = self.state.auth.check_grpc(&request)?;
        let r = request.into_inner();
        let spec =
            SubscriptionSpec::from_request(&r, &self.state.default_topic, &self.state.limits)?;
        self.state
            .auth
            .allow(key.as_deref(), &spec.topic, Right::Read)?;
        let permit = stream_permit(&self.state)?;
        if let Some(g) = &spec.group {
            if g.acked {
                return Err(ApiError::invalid(
                    "delivery_mode",
                    "AT_LEAST_ONCE needs acknowledgements: use ConsumeMarketData (bidirectional) or a WebSocket",
                )
                .into());
            }
            let heartbeat = spec.heartbeat;
            let member =
                crate::group::join(&self.state, spec, Wire::Grpc, Arc::new(Notify::new())).await?;
            let outbox = member.outbox.clone();
            return Ok(Response::new(outbox_frames(
                outbox,
                None,
                (member, permit),
                heartbeat,
            )));
        }
        let heartbeat = spec.heartbeat;
        let name = spec.name.clone();
        let sub = self
            .state
            .hub
            .subscribe(spec, Wire::Grpc, Arc::new(Notify::new()))
            .await?;
        self.state.subscriptions.attach(&name, &sub);
        tracing::debug!(id = sub.id, topic = %sub.topic, "grpc stream opened");
        let s = frames(sub, heartbeat);
        // The permit lives as long as the stream.
        let s = futures::StreamExt::map(s, move |x| {
            let _ = &permit;
            x
        });
        Ok(Response::new(Box::pin(s)))
    }

    async fn stream_historical_data(
        &self,
        request: Request<pb::HistoricalRequest>,
    ) -> Result<Response<EncodedStream>, Status> {
        let (r, topic) = admit(&self.state, request, |r| &r.topic, Right::Read)?;
        let bars = crate::history::BarSpec::from_request(&r, topic.clone())?;
        let spec = match bars {
            Some(_) => None,
            None => Some(crate::history::RangeSpec::from_request(&r, topic)?),
        };
        let permit = self
            .state
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Limit("too many streams on this node".into()))?;
        let rx = match (bars, spec) {
            (Some(b), _) => {
                if !self.state.engine.topics().iter().any(|t| t.name == b.topic) {
                    return Err(ApiError::NotFound {
                        what: "topic",
                        name: b.topic,
                    }
                    .into());
                }
                let dir = self.state.engine.bars_dir().ok_or_else(|| {
                    ApiError::Unavailable(
                        "this node keeps no history (history.enabled or journal.enabled is false)"
                            .into(),
                    )
                })?;
                crate::history::start_bars(
                    dir,
                    self.state.hub.symbology()?,
                    self.state.engine.resampler(),
                    self.state.engine.open_bars(),
                    b,
                    self.state.config.max_batch,
                    self.state.cancel.child_token(),
                )?
            }
            (None, Some(spec)) => crate::history::start(
                self.state.engine.node_dir(),
                spec,
                self.state.config.max_batch,
                self.state.cancel.child_token(),
            )?,
            (None, None) => return Err(ApiError::internal("no historical request").into()),
        };
        let stream = futures::stream::unfold((rx, permit), |(mut rx, permit)| async move {
            let e = rx.recv().await?;
            Some((Ok(e), (rx, permit)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type ConsumeMarketDataStream = EncodedStream;

    async fn consume_market_data(
        &self,
        request: Request<tonic::Streaming<pb::ConsumeRequest>>,
    ) -> Result<Response<EncodedStream>, Status> {
        let key = self.state.auth.check_grpc(&request)?;
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream ended before `subscribe`"))?;
        let Some(pb::consume_request::Kind::Subscribe(r)) = first.kind else {
            return Err(ApiError::invalid(
                "subscribe",
                "the first ConsumeRequest must be `subscribe`",
            )
            .into());
        };
        let spec =
            SubscriptionSpec::from_request(&r, &self.state.default_topic, &self.state.limits)?;
        if spec.group.is_none() {
            return Err(ApiError::invalid(
                "subscribe.delivery_mode",
                "ConsumeMarketData serves subscription groups: set delivery_mode AT_LEAST_ONCE or a subscription_type other than EXCLUSIVE (StreamMarketData serves plain streams)",
            )
            .into());
        }
        self.state
            .auth
            .allow(key.as_deref(), &spec.topic, Right::Read)?;
        let permit = stream_permit(&self.state)?;
        let heartbeat = spec.heartbeat;
        let member = Arc::new(
            crate::group::join(&self.state, spec, Wire::Grpc, Arc::new(Notify::new())).await?,
        );
        let outbox = member.outbox.clone();
        // Acks arrive on the request stream; a bad one ends this stream
        // (and only it) with INVALID_ARGUMENT naming the field.
        let acker = member.clone();
        let reader = tokio::spawn(async move {
            loop {
                let m = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) | Err(_) => return,
                };
                let r = match m.kind {
                    Some(pb::consume_request::Kind::Ack(a)) => acker.ack(
                        a.message_ids
                            .iter()
                            .map(|m| (m.partition, m.sequence))
                            .collect(),
                        a.cumulative,
                    ),
                    Some(pb::consume_request::Kind::Subscribe(_)) => Err(ApiError::invalid(
                        "subscribe",
                        "already subscribed: one subscription per ConsumeMarketData stream",
                    )),
                    None => Err(ApiError::invalid("kind", "an empty ConsumeRequest")),
                };
                if let Err(e) = r {
                    tracing::debug!(error = %e, "consumer request refused");
                    acker.outbox.close(Closed::Removed(e.to_string()));
                    return;
                }
            }
        });
        let hold = (member, permit, AbortOnDrop(reader));
        Ok(Response::new(outbox_frames(outbox, None, hold, heartbeat)))
    }

    async fn manage_subscription(
        &self,
        request: Request<pb::SubscriptionRequest>,
    ) -> Result<Response<pb::SubscriptionResponse>, Status> {
        let (r, _) = admit(&self.state, request, |r| &r.topic, Right::Admin)?;
        Ok(Response::new(
            self.state.subscriptions.manage(&self.state, r).await?,
        ))
    }
}

/// The `TopicManager` service.
pub struct TopicService {
    state: Arc<EdgeState>,
}

impl TopicService {
    /// Over the edge's state.
    pub fn new(state: Arc<EdgeState>) -> TopicService {
        TopicService { state }
    }
}

#[tonic::async_trait]
impl pb::topic_manager_server::TopicManager for TopicService {
    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::TopicInfo>, Status> {
        let (r, _) = admit(&self.state, request, |r| &r.topic, Right::Admin)?;
        Ok(Response::new(
            crate::admin::create_topic(&self.state, r).await?,
        ))
    }

    async fn update_topic(
        &self,
        request: Request<pb::UpdateTopicRequest>,
    ) -> Result<Response<pb::TopicInfo>, Status> {
        let (r, topic) = admit(&self.state, request, |r| &r.topic, Right::Admin)?;
        named(&r.topic)?;
        Ok(Response::new(
            crate::admin::grow_topic(&self.state, &topic, r.partitions).await?,
        ))
    }

    async fn delete_topic(
        &self,
        request: Request<pb::TopicRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let (r, topic) = admit(&self.state, request, |r| &r.topic, Right::Admin)?;
        named(&r.topic)?;
        crate::admin::delete_topic(&self.state, &topic).await?;
        Ok(Response::new(pb::DeleteResponse { deleted: true }))
    }

    async fn get_topic_stats(
        &self,
        request: Request<pb::TopicRequest>,
    ) -> Result<Response<pb::TopicStats>, Status> {
        let (_, topic) = admit(&self.state, request, |r| &r.topic, Right::Read)?;
        Ok(Response::new(crate::admin::topic_stats(
            &self.state,
            &topic,
        )?))
    }

    async fn list_topics(
        &self,
        request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let key = self.state.auth.check_grpc(&request)?;
        let topics = crate::admin::list_topics(&self.state)
            .into_iter()
            .filter(|t| {
                self.state
                    .auth
                    .allow(key.as_deref(), &t.topic, Right::Read)
                    .is_ok()
            })
            .collect();
        Ok(Response::new(pb::ListTopicsResponse { topics }))
    }
}

/// The `SubscriptionManager` service.
pub struct SubscriptionService {
    state: Arc<EdgeState>,
}

impl SubscriptionService {
    /// Over the edge's state.
    pub fn new(state: Arc<EdgeState>) -> SubscriptionService {
        SubscriptionService { state }
    }
}

#[tonic::async_trait]
impl pb::subscription_manager_server::SubscriptionManager for SubscriptionService {
    async fn create_subscription(
        &self,
        request: Request<pb::SubscriptionRequest>,
    ) -> Result<Response<pb::SubscriptionResponse>, Status> {
        let (mut r, topic) = admit(&self.state, request, |r| &r.topic, Right::Admin)?;
        r.topic = topic;
        r.action = pb::SubscriptionAction::Create as i32;
        Ok(Response::new(
            self.state.subscriptions.manage(&self.state, r).await?,
        ))
    }

    async fn delete_subscription(
        &self,
        request: Request<pb::DeleteSubscriptionRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let (r, topic) = admit(&self.state, request, |r| &r.topic, Right::Admin)?;
        self.state
            .subscriptions
            .delete(&self.state, &topic, &r.subscription)
            .await?;
        Ok(Response::new(pb::DeleteResponse { deleted: true }))
    }

    async fn get_subscription_stats(
        &self,
        request: Request<pb::DeleteSubscriptionRequest>,
    ) -> Result<Response<pb::SubscriptionStats>, Status> {
        let (r, topic) = admit(&self.state, request, |r| &r.topic, Right::Read)?;
        Ok(Response::new(self.state.subscriptions.stats(
            &self.state.groups,
            &topic,
            &r.subscription,
        )?))
    }
}

/// Topic stats' subscriber count, for tests and metrics.
pub fn subscribers(state: &EdgeState, topic: &str) -> u64 {
    state
        .hub
        .topic(topic)
        .map_or(0, |t| t.subscribers.load(Ordering::Relaxed))
}

/// Ends a task when the stream holding it is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use tickwire_proto::pb;

    fn batch(seqs: &[u64]) -> Vec<u8> {
        pb::StreamResponse {
            kind: Some(pb::stream_response::Kind::Batch(pb::MarketDataBatch {
                messages: seqs
                    .iter()
                    .map(|&s| pb::MarketDataMessage {
                        metadata: Some(pb::MessageMetadata {
                            sequence: s,
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
            })),
        }
        .encode_to_vec()
    }

    /// What `merge_queued` relies on: two encoded batch responses back to
    /// back decode as one batch holding both, in order.
    #[test]
    fn concatenated_batch_responses_decode_as_one_batch_in_order() {
        let mut bytes = batch(&[1, 2]);
        bytes.extend(batch(&[3]));
        bytes.extend(batch(&[4, 5]));
        let r = pb::StreamResponse::decode(bytes.as_slice()).expect("decodes");
        let Some(pb::stream_response::Kind::Batch(b)) = r.kind else {
            panic!("a batch: {r:?}");
        };
        let seqs: Vec<u64> = b
            .messages
            .iter()
            .map(|m| m.metadata.as_ref().map_or(0, |md| md.sequence))
            .collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
    }
}
