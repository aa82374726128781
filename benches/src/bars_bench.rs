//! `tickwire-bench history` cases `history_1m_day` and `history_1h_month`:
//! REST history latency beside the same query in PostgreSQL, in one run.
//!
//! A broker with the journal and the bar builder takes 31 days of trades
//! of one instrument (three a minute, stamped in the past), builds its
//! one-minute bars, and serves them over REST. The same bars go into a
//! PostgreSQL table (`bench_bars_1m`, indexed on symbol and time), and the
//! two queries run against each:
//!
//! - `history_1m_day`: one day of 1m bars (1440 rows): tickwire reads them
//!   from the bar store; PostgreSQL with an index range scan.
//! - `history_1h_month`: 30 days of 1h bars (720 rows from 43,200 1m
//!   bars): tickwire resamples with Polars; PostgreSQL with `date_bin`
//!   and ordered aggregates.
//!
//! Latency is per request, as the client sees it: tickwire over one
//! keep-alive HTTP/1.1 connection, to the last byte of the JSON body (then
//! parsed and checked, untimed); PostgreSQL over one connection with a
//! prepared statement, to the rows fetched and decoded. The broker's shard and the journal are on `--shard-core`,
//! the clients on `--client-core`; the edge's runtime and the bar builder
//! are not pinned. Needs `scripts/services.sh up` for PostgreSQL
//! (`TICKWIRE_POSTGRES_URL` overrides the URL) and the `history` feature
//! for 1h bars (`cargo run --release -p benches --features history`).

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use sqlx::Row;
use tickwire_proto::FrameBody;
use tickwire_proto::bars::{BarFile, Interval, MINUTE_NS, bar_files};
use tickwire_proto::futex::realtime_ns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOPIC: &str = "bench/bars";
const DAYS: u64 = 31;

fn postgres_url() -> String {
    std::env::var("TICKWIRE_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://tickwire:tickwire@127.0.0.1:5432/tickwire".into())
}

/// One keep-alive HTTP/1.1 connection: GET, read the head, then exactly
/// `content-length` bytes of body.
struct Http {
    s: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Http {
    async fn connect(addr: std::net::SocketAddr) -> Result<Http, String> {
        let s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = s.set_nodelay(true);
        Ok(Http {
            s,
            buf: Vec::with_capacity(1 << 20),
        })
    }

    /// Returns (status, body).
    async fn get(&mut self, path: &str) -> Result<(u16, Vec<u8>), String> {
        let req = format!("GET {path} HTTP/1.1\r\nhost: bench\r\n\r\n");
        self.s
            .write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        self.buf.clear();
        let mut chunk = [0u8; 64 * 1024];
        let head_end = loop {
            let n = self.s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = memchr::memmem::find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_ascii_lowercase();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or("no status")?;
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or("no content-length")?;
        while self.buf.len() < head_end + len {
            let n = self.s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed mid-body".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok((status, self.buf[head_end..head_end + len].to_vec()))
    }
}

fn pct_us(h: &Histogram<u64>) -> Value {
    let us = |v: u64| v as f64 / 1000.0;
    json!({
        "p50_us": us(h.value_at_quantile(0.5)),
        "p99_us": us(h.value_at_quantile(0.99)),
        "p999_us": us(h.value_at_quantile(0.999)),
        "max_us": us(h.max()),
        "requests": h.len(),
    })
}

/// The two REST paths and their expected row counts.
struct Case {
    name: &'static str,
    interval: Interval,
    from: u64,
    to: u64,
    rows: usize,
}

/// Runs the cases; prints each row.
///
/// # Errors
/// A broker or edge that cannot start, bars not built in time.
pub fn run(
    b: &crate::history_bench::HistoryBench,
    cases: &[&str],
    out: &dyn Fn(Value),
) -> Result<(), String> {
    let shm = crate::tw::fresh_dir("bars");
    let jdir = b.dir.join(format!("bars-{}", std::process::id()));
    let mut cfg = crate::tw::shared_core_config(shm.clone(), b.shard_core, TOPIC, 1 << 16);
    cfg.stats.log_interval_secs = 0;
    cfg.journal.enabled = true;
    cfg.journal.dir = Some(jdir.clone());
    cfg.journal.core = Some(b.journal_core);
    cfg.history.enabled = true;
    cfg.history.lateness = "1s".into();
    cfg.edge.enabled = true;
    cfg.edge.grpc_addr = "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?;
    cfg.edge.http_addr = "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?;
    let result = run_on(b, &cfg, cases, out);
    let _ = std::fs::remove_dir_all(&shm);
    let _ = std::fs::remove_dir_all(&jdir);
    result
}

fn run_on(
    b: &crate::history_bench::HistoryBench,
    cfg: &tickwire_broker::config::Config,
    cases: &[&str],
    out: &dyn Fn(Value),
) -> Result<(), String> {
    let broker = tickwire_broker::engine::Broker::start(cfg).map_err(|e| format!("broker: {e}"))?;
    let mut ingest = broker.ingest(1);
    let route = crate::tw::bench_route(&mut ingest, TOPIC)?;
    // 31 days of minutes, three trades each, ending on the last full hour.
    let end = Interval::H1.bucket(realtime_ns()) - Interval::H1.ns();
    let t0 = end - DAYS * Interval::D1.ns();
    let minutes = DAYS * 1440;
    let started = Instant::now();
    for m in 0..minutes {
        for j in 0..3u64 {
            let px = 100_000_000_000 + ((m * 7919 + j * 104_729) % 5_000) as i64 * 1_000_000;
            let mut body = FrameBody::trade(0, t0 + m * MINUTE_NS + j * 20_000_000_000, px, 100);
            body.source_seq = m * 3 + j;
            while ingest.try_send(&route, &body, None).is_err() {
                std::hint::spin_loop();
            }
        }
    }
    // Built when every minute's bar is written.
    let bars = broker.bars().ok_or("the bar builder is off")?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while bars
        .counters()
        .bars
        .load(std::sync::atomic::Ordering::Relaxed)
        < minutes
    {
        if Instant::now() > deadline {
            return Err("bars were not built within 300 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let build_secs = started.elapsed().as_secs_f64();
    out(json!({
        "bench": "history", "case": "bars_built", "system": "tickwire",
        "events": minutes * 3, "bars": minutes, "seconds": build_secs,
        "note": "ingest, journal and bar building of 31 days of one instrument's trades",
    }));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let edge = crate::tw::start_edge(&rt, cfg, &broker, &cancel)?;
    let all = [
        Case {
            name: "history_1m_day",
            interval: Interval::M1,
            from: end - Interval::D1.ns(),
            to: end,
            rows: 1440,
        },
        Case {
            name: "history_1h_month",
            interval: Interval::H1,
            from: end - 30 * Interval::D1.ns(),
            to: end,
            rows: 720,
        },
    ];
    let wanted: Vec<&Case> = all.iter().filter(|c| cases.contains(&c.name)).collect();
    // The client runs on its own core, in its own runtime.
    crate::pin(b.client_core);
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let bar_dir = tickwire_api::bars::bar_dir(&cfg.journal_dir());
    let result = client.block_on(async {
        let pg = postgres(&bar_dir, &broker).await;
        for c in wanted {
            let mut h = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
            let mut http = Http::connect(edge.http_addr).await?;
            let path = format!(
                "/api/v1/market-data/BENCH/history?topic=bench%2Fbars&interval={}&start_time={}&end_time={}&limit=10000",
                c.interval.name(),
                c.from,
                c.to
            );
            let mut bytes = 0usize;
            for i in 0..(b.history_requests + 20) {
                let t = Instant::now();
                let (status, body) = http.get(&path).await?;
                // Time to the last byte of the response; parsing it is the client's.
                let took = t.elapsed().as_nanos() as u64;
                let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
                if status == 501 {
                    // Built without the history feature: no 1h bars.
                    out(json!({"bench": "history", "case": c.name, "system": "tickwire", "error": v}));
                    break;
                }
                if status != 200 {
                    return Err(format!("{}: HTTP {status}: {v}", c.name));
                }
                let n = v["count"].as_u64().unwrap_or(0) as usize;
                if n != c.rows {
                    return Err(format!("{}: {n} bars, expected {}", c.name, c.rows));
                }
                bytes = body.len();
                if i >= 20 {
                    let _ = h.record(took);
                }
            }
            if h.is_empty() {
                continue;
            }
            let mut row = json!({"bench": "history", "case": c.name, "system": "tickwire", "rows": c.rows, "response_bytes": bytes});
            merge(&mut row, pct_us(&h));
            out(row);
            match &pg {
                Ok(pool) => {
                    let p = pg_case(pool, c, b.history_requests).await?;
                    let mut row = json!({"bench": "history", "case": c.name, "system": "postgres", "rows": c.rows});
                    merge(&mut row, pct_us(&p));
                    out(row);
                    let ratio = |q: f64| p.value_at_quantile(q) as f64 / h.value_at_quantile(q).max(1) as f64;
                    out(json!({
                        "bench": "history", "case": c.name,
                        "ratio_p50_postgres_to_tickwire": ratio(0.5),
                        "ratio_p99_postgres_to_tickwire": ratio(0.99),
                    }));
                }
                Err(e) => out(json!({"bench": "history", "case": c.name, "system": "postgres", "error": e})),
            }
        }
        Ok::<(), String>(())
    });
    cancel.cancel();
    drop(rt);
    drop(ingest);
    broker.shutdown();
    result
}

/// Connects to PostgreSQL and loads the bar store's bars into
/// `bench_bars_1m` (prices and notional as fixed-point bigints, as the
/// store has them; time as timestamptz).
async fn postgres(
    bar_dir: &std::path::Path,
    broker: &tickwire_broker::engine::Broker,
) -> Result<sqlx::PgPool, String> {
    let url = postgres_url();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&url)
        .await
        .map_err(|e| format!("postgres at {url} (scripts/services.sh up): {e}"))?;
    let id = tickwire_proto::symbology::Symbology::open(broker.node_dir())
        .ok()
        .and_then(|s| (1..=s.count()).find(|&i| s.get(i).is_some_and(|e| e.symbol() == "BENCH")))
        .ok_or("BENCH is not in the symbology")?;
    let mut lists = Vec::new();
    for (_, path) in bar_files(bar_dir, TOPIC, id) {
        if let Some(file) = BarFile::open(&path).map_err(|e| e.to_string())? {
            lists.push(
                file.range(0, u64::MAX, usize::MAX)
                    .map_err(|e| e.to_string())?,
            );
        }
    }
    let bars = tickwire_proto::bars::merge_bars(lists);
    for q in [
        "DROP TABLE IF EXISTS bench_bars_1m",
        "CREATE TABLE bench_bars_1m (symbol text NOT NULL, ts timestamptz NOT NULL, open bigint NOT NULL, high bigint NOT NULL, low bigint NOT NULL, close bigint NOT NULL, volume bigint NOT NULL, notional bigint NOT NULL, trades integer NOT NULL, PRIMARY KEY (symbol, ts))",
    ] {
        sqlx::query(q)
            .execute(&pool)
            .await
            .map_err(|e| e.to_string())?;
    }
    for chunk in bars.chunks(10_000) {
        let col =
            |f: fn(&tickwire_proto::bars::Bar) -> i64| chunk.iter().map(f).collect::<Vec<i64>>();
        sqlx::query(
            "INSERT INTO bench_bars_1m SELECT 'BENCH', to_timestamp(t::float8 / 1e9), o, h, l, c, v, n, k::integer \
             FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[]) AS u(t, o, h, l, c, v, n, k)",
        )
        .bind(col(|b| b.start_ns as i64))
        .bind(col(|b| b.open))
        .bind(col(|b| b.high))
        .bind(col(|b| b.low))
        .bind(col(|b| b.close))
        .bind(col(|b| b.volume as i64))
        .bind(col(|b| b.notional as i64))
        .bind(col(|b| i64::from(b.count)))
        .execute(&pool)
        .await
        .map_err(|e| e.to_string())?;
    }
    sqlx::query("ANALYZE bench_bars_1m")
        .execute(&pool)
        .await
        .map_err(|e| e.to_string())?;
    Ok(pool)
}

/// The case's query in PostgreSQL: its latency per request, rows decoded.
async fn pg_case(pool: &sqlx::PgPool, c: &Case, requests: u64) -> Result<Histogram<u64>, String> {
    let sql = match c.interval {
        Interval::M1 => {
            "SELECT (EXTRACT(EPOCH FROM ts) * 1000000)::bigint, open, high, low, close, volume, trades::bigint, notional \
             FROM bench_bars_1m WHERE symbol = $1 AND ts >= to_timestamp($2::float8 / 1e9) AND ts < to_timestamp($3::float8 / 1e9) ORDER BY ts LIMIT 10000"
        }
        _ => {
            "SELECT (EXTRACT(EPOCH FROM b) * 1000000)::bigint, o, h, l, c, v, k, n FROM ( \
               SELECT date_bin('1 hour', ts, TIMESTAMPTZ '1970-01-01 00:00:00+00') AS b, \
                 (array_agg(open ORDER BY ts))[1] AS o, max(high) AS h, min(low) AS l, \
                 (array_agg(close ORDER BY ts DESC))[1] AS c, sum(volume)::bigint AS v, \
                 sum(trades)::bigint AS k, sum(notional)::bigint AS n \
               FROM bench_bars_1m WHERE symbol = $1 AND ts >= to_timestamp($2::float8 / 1e9) AND ts < to_timestamp($3::float8 / 1e9) \
               GROUP BY b ORDER BY b) q"
        }
    };
    let mut h = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    for i in 0..(requests + 20) {
        let t = Instant::now();
        let rows = sqlx::query(sql)
            .bind("BENCH")
            .bind(c.from as i64)
            .bind(c.to as i64)
            .fetch_all(pool)
            .await
            .map_err(|e| format!("{}: {e}", c.name))?;
        let mut sum = 0i64;
        for r in &rows {
            for k in 0..8 {
                sum = sum.wrapping_add(r.try_get::<i64, _>(k).map_err(|e| e.to_string())?);
            }
        }
        let took = t.elapsed().as_nanos() as u64;
        std::hint::black_box(sum);
        if rows.len() != c.rows {
            return Err(format!(
                "{}: postgres returned {} rows, expected {}",
                c.name,
                rows.len(),
                c.rows
            ));
        }
        if i >= 20 {
            let _ = h.record(took);
        }
    }
    Ok(h)
}

fn merge(row: &mut Value, more: Value) {
    if let (Some(o), Value::Object(m)) = (row.as_object_mut(), more) {
        o.extend(m);
    }
}

/// `cache_latest`: REST latest on a node that does not hold the symbol
/// (answered from Redis, written there by the node that does), beside
/// REST latest on the node that holds it and a plain Redis GET of the same
/// key, each over one connection from the client core.
///
/// # Errors
/// A broker or edge that cannot start; Redis unreachable is a row.
pub fn cache_latest(
    b: &crate::history_bench::HistoryBench,
    out: &dyn Fn(Value),
) -> Result<(), String> {
    let url =
        std::env::var("TICKWIRE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let node = |tag: &str| {
        let dir = crate::tw::fresh_dir(tag);
        let mut cfg = crate::tw::shared_core_config(dir.clone(), b.shard_core, TOPIC, 1 << 12);
        cfg.stats.log_interval_secs = 0;
        cfg.edge.enabled = true;
        cfg.edge.grpc_addr = "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?;
        cfg.edge.http_addr = "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?;
        cfg.edge.cache_url = url.clone();
        cfg.edge.cache_interval_ms = 100;
        let broker =
            tickwire_broker::engine::Broker::start(&cfg).map_err(|e| format!("broker: {e}"))?;
        Ok::<_, String>((dir, cfg, broker))
    };
    let (dir_a, cfg_a, a) = node("cache-a")?;
    let (dir_b, cfg_b, b_node) = node("cache-b")?;
    let mut ingest = a.ingest(1);
    let route = crate::tw::bench_route(&mut ingest, TOPIC)?;
    let body = FrameBody::trade(0, realtime_ns(), 123_450_000_000, 100);
    while ingest.try_send(&route, &body, None).is_err() {
        std::hint::spin_loop();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let ea = crate::tw::start_edge(&rt, &cfg_a, &a, &cancel)?;
    let eb = crate::tw::start_edge(&rt, &cfg_b, &b_node, &cancel)?;
    crate::pin(b.client_core);
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let path = "/api/v1/market-data/BENCH/latest?topic=bench%2Fbars";
    let result = client.block_on(async {
        // B answers once A's writer has put the key in Redis.
        let mut http_b = Http::connect(eb.http_addr).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, _) = http_b.get(path).await?;
            if status == 200 {
                break;
            }
            if Instant::now() > deadline {
                out(json!({"bench": "history", "case": "cache_latest", "system": "tickwire", "error": format!("node B never answered from Redis at {url}: is it up (scripts/services.sh up)?")}));
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut http_a = Http::connect(ea.http_addr).await?;
        for (system, http) in [("tickwire_remote_via_redis", &mut http_b), ("tickwire_local", &mut http_a)] {
            let mut h = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
            for i in 0..(b.history_requests * 10 + 100) {
                let t = Instant::now();
                let (status, body) = http.get(path).await?;
                let took = t.elapsed().as_nanos() as u64;
                if status != 200 {
                    return Err(format!("cache_latest: HTTP {status}: {}", String::from_utf8_lossy(&body)));
                }
                if i >= 100 {
                    let _ = h.record(took);
                }
            }
            let mut row = json!({"bench": "history", "case": "cache_latest", "system": system});
            merge(&mut row, pct_us(&h));
            out(row);
        }
        // The floor: the same key with a plain GET over one connection.
        let mut conn = redis::Client::open(url.as_str())
            .map_err(|e| e.to_string())?
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        let mut h = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
        for i in 0..(b.history_requests * 10 + 100) {
            let t = Instant::now();
            let v: Option<String> = redis::cmd("GET")
                .arg("latest:BENCH")
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            let took = t.elapsed().as_nanos() as u64;
            if v.is_none() {
                return Err("latest:BENCH vanished from Redis".into());
            }
            if i >= 100 {
                let _ = h.record(took);
            }
        }
        let mut row = json!({"bench": "history", "case": "cache_latest", "system": "redis_get"});
        merge(&mut row, pct_us(&h));
        out(row);
        Ok::<(), String>(())
    });
    cancel.cancel();
    drop(rt);
    drop(ingest);
    a.shutdown();
    b_node.shutdown();
    let _ = std::fs::remove_dir_all(&dir_a);
    let _ = std::fs::remove_dir_all(&dir_b);
    result
}
