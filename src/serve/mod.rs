//! `pipeline serve`: one cell of a study as an HTTP API (axum on tokio). The answers are the
//! study's: the same clean-up, retrieved examples, prompt, row key, task and calibration, so a
//! text the study computed is answered from the row cache and a new answer is written to
//! it. One worker thread owns the models; requests reach it through a bounded queue.

mod api;
mod scorer;
mod worker;
mod write_behind;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use tokio::sync::{mpsc, oneshot};
use utoipa::OpenApi;

pub use api::{
    ApiError, ClassifyBatchRequest, ClassifyBatchResponse, ClassifyRequest, ClassifyResponse,
    Health, SentimentBatchRequest, SentimentBatchResponse, SentimentRequest, SentimentResponse,
    SimilarRow,
};
use scorer::{Kind, Scorer};
use worker::{InferItem, Job, WorkerSpec};
use write_behind::WriteBehind;

use crate::backend::{Backend, EmbedderLoad, ModelLoad};
use crate::cache::{Cache, CachedRow};
use crate::plan::Plan;
use crate::store::Store;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub addr: SocketAddr,
    /// Requests waiting for the model beyond this many are answered 429.
    pub queue: usize,
    /// Most texts in one batch request.
    pub max_batch: usize,
    /// Largest request body, in bytes.
    pub body_limit: usize,
    pub threads: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:8080".parse().expect("a valid address"),
            queue: 64,
            max_batch: 32,
            body_limit: 1 << 20,
            threads: crate::exec::default_threads(),
        }
    }
}

/// Prometheus metrics of the server.
struct Telemetry {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    queue_depth: IntGauge,
    cache_hits: IntCounter,
    cache_misses: IntCounter,
    /// Rows the model computed and the server stored, whether or not their client waited.
    rows_stored: IntCounter,
}

impl Telemetry {
    fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "pipeline_requests_total",
                "HTTP requests by endpoint and status",
            ),
            &["endpoint", "status"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new("pipeline_request_duration_seconds", "Request latency").buckets(
                vec![
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            ),
            &["endpoint"],
        )
        .expect("valid metric");
        let queue_depth =
            IntGauge::new("pipeline_queue_depth", "Jobs waiting for the model worker")
                .expect("valid metric");
        let cache_hits = IntCounter::new(
            "pipeline_cache_hits_total",
            "Texts answered from the row cache",
        )
        .expect("valid metric");
        let cache_misses =
            IntCounter::new("pipeline_cache_misses_total", "Texts computed by the model")
                .expect("valid metric");
        let rows_stored = IntCounter::new(
            "pipeline_rows_stored_total",
            "Rows computed by the model and kept for the row cache (also when the client left)",
        )
        .expect("valid metric");
        for m in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(rows_stored.clone()),
            Box::new(latency.clone()),
            Box::new(queue_depth.clone()),
            Box::new(cache_hits.clone()),
            Box::new(cache_misses.clone()),
        ] {
            registry.register(m).expect("distinct metrics");
        }
        Self {
            registry,
            requests,
            latency,
            queue_depth,
            cache_hits,
            cache_misses,
            rows_stored,
        }
    }
}

/// What the handlers share.
struct Shared {
    cell: String,
    ready: AtomicBool,
    detail: Mutex<Option<String>>,
    served: Mutex<Option<Arc<Served>>>,
    /// One queue per model worker.
    jobs: Vec<mpsc::Sender<Job>>,
    storage: WriteBehind,
    /// Wakes the writer when a batch is due.
    batch_due: tokio::sync::Notify,
    telemetry: Telemetry,
    max_batch: usize,
    /// Rows being computed on tasks of their own (their client may have left): shutdown
    /// waits for them before the last rows are written.
    computing: tokio::sync::watch::Sender<usize>,
}

/// One row computing on a task of its own, counted in [`Shared::computing`] while it lives.
struct Computing(Arc<Shared>);

impl Computing {
    fn start(shared: &Arc<Shared>) -> Self {
        shared.computing.send_modify(|n| *n += 1);
        Self(shared.clone())
    }
}

impl Drop for Computing {
    fn drop(&mut self) {
        self.0.computing.send_modify(|n| *n -= 1);
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "pipeline serve",
        description = "One cell of a pipeline study as an HTTP API: the study's model, prompt, method and calibration."
    ),
    paths(classify, classify_batch, sentiment, sentiment_batch, health, metrics),
    components(schemas(
        ClassifyRequest,
        ClassifyBatchRequest,
        ClassifyResponse,
        ClassifyBatchResponse,
        SentimentRequest,
        SentimentBatchRequest,
        SentimentResponse,
        SentimentBatchResponse,
        SimilarRow,
        Health,
        ApiError
    ))
)]
struct ApiDoc;

/// The OpenAPI document of the API.
pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes")
}

/// A served cell with everything the plan decides ready: its embeddings in the store, its
/// calibration fitted; for a cascade, each stage so, and every threshold known.
pub struct Startup {
    pub plan: Plan,
    /// The served cell's id.
    pub cell: String,
    /// The cells that answer, in turn (one unless the cell is a cascade), each with its
    /// fitted calibration.
    pub stages: Vec<(crate::plan::Cell, Option<crate::calibrate::Params>)>,
    /// A cascade's margin threshold of each step.
    pub thresholds: Vec<f64>,
    pub cache: Cache,
    pub store: Store,
    /// As the study's rows were evaluated (their keys record it).
    pub packing: crate::backend::Packing,
}

/// The scorers of the cells that answer, in turn, and the worker each runs on.
struct Served {
    stages: Vec<(Scorer, usize)>,
    thresholds: Vec<f64>,
}

impl Served {
    fn first(&self) -> &Scorer {
        &self.stages[0].0
    }
}

impl Shared {
    fn queue_depth(&self) -> i64 {
        self.jobs
            .iter()
            .map(|j| j.max_capacity() - j.capacity())
            .sum::<usize>() as i64
    }
}

/// Makes a backend on the thread that will own it.
pub type MakeBackend = Arc<dyn Fn() -> Box<dyn Backend> + Send + Sync>;

/// Serve `startup.cell` until SIGTERM or Ctrl-C; in-flight requests finish first. The
/// model loads in the background while `/health` answers 503. `on_listen` is told the
/// address once the socket is bound.
/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the server stopped: {0}")]
    Http(#[source] std::io::Error),
    #[error("the model loader stopped: {0}")]
    Loader(#[source] tokio::task::JoinError),
    #[error("cannot write the cache: {0}")]
    Cache(#[source] crate::cache::CacheError),
}

pub fn serve(
    startup: Startup,
    opts: &ServeOptions,
    make_backend: MakeBackend,
    on_listen: Box<dyn FnOnce(SocketAddr) + Send>,
) -> Result<(), ServeError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    rt.block_on(run_server(startup, opts.clone(), make_backend, on_listen))
}

async fn run_server(
    startup: Startup,
    opts: ServeOptions,
    make_backend: MakeBackend,
    on_listen: Box<dyn FnOnce(SocketAddr) + Send>,
) -> Result<(), ServeError> {
    let Startup {
        plan,
        cell,
        stages,
        thresholds,
        cache,
        store,
        packing,
    } = startup;
    // One worker per model: a cascade's stages on one model share its worker.
    let mut models: Vec<Option<usize>> = Vec::new();
    for (c, _) in &stages {
        if !models.contains(&c.model()) {
            models.push(c.model());
        }
    }
    let (txs, rxs): (Vec<_>, Vec<_>) = models
        .iter()
        .map(|_| mpsc::channel::<Job>(opts.queue.max(1)))
        .unzip();
    let shared = Arc::new(Shared {
        cell,
        ready: AtomicBool::new(false),
        detail: Mutex::new(Some("loading the model".into())),
        served: Mutex::new(None),
        jobs: txs,
        storage: WriteBehind::new(cache, store),
        batch_due: tokio::sync::Notify::new(),
        telemetry: Telemetry::new(),
        max_batch: opts.max_batch,
        computing: tokio::sync::watch::Sender::new(0),
    });
    let listener = tokio::net::TcpListener::bind(opts.addr)
        .await
        .map_err(|source| ServeError::Listen {
            addr: opts.addr,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: opts.addr,
        source,
    })?;
    on_listen(local);

    // Load in the background: /health says 503 until the worker has its models.
    let loader = {
        let shared = shared.clone();
        let threads = opts.threads;
        tokio::task::spawn_blocking(move || {
            load(
                shared,
                plan,
                stages,
                thresholds,
                models,
                (threads, packing),
                make_backend,
                rxs,
            )
        })
    };

    // Write what the server computes in batches, as a run commits.
    let (stop_writer, stopped) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(write_batches(shared.clone(), stopped));

    let app = Router::new()
        .route("/v1/classify", post(classify))
        .route("/v1/classify/batch", post(classify_batch))
        .route("/v1/sentiment", post(sentiment))
        .route("/v1/sentiment/batch", post(sentiment_batch))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route(
            "/openapi.json",
            get(|| async { ([("content-type", "application/json")], openapi_json()) }),
        )
        .layer(DefaultBodyLimit::max(opts.body_limit))
        .with_state(shared.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(ServeError::Http)?;
    // In-flight requests are answered, and rows whose clients left are finished: write
    // what waits, keep the cache compact, stop the worker.
    let _ = shared.computing.subscribe().wait_for(|n| *n == 0).await;
    let _ = stop_writer.send(true);
    let _ = writer.await;
    drop(shared.served.lock().expect("not poisoned").take());
    let closed = shared.storage.close();
    let workers = loader.await.map_err(ServeError::Loader)?;
    if let Ok(s) = Arc::try_unwrap(shared) {
        drop(s.jobs);
        for w in workers {
            let _ = w.join();
        }
    }
    closed.map_err(ServeError::Cache)
}

/// Write waiting rows and vectors every few seconds, or when a batch is due, until stopped.
async fn write_batches(shared: Arc<Shared>, mut stopped: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(write_behind::INTERVAL) => {}
            _ = shared.batch_due.notified() => {}
            _ = stopped.changed() => return,
        }
        if shared.storage.waiting() == 0 {
            continue;
        }
        let s = shared.clone();
        match tokio::task::spawn_blocking(move || s.storage.flush()).await {
            Ok(Ok(())) => {}
            // The rows keep answering from memory; the next batch tries again.
            Ok(Err(e)) => eprintln!("serve: cannot write the cache yet: {e}"),
            Err(e) => eprintln!("serve: the cache writer stopped: {e}"),
        }
    }
}

/// Build the scorers and start one worker per model, which loads it (the first also loads
/// the embedder). Ready once every worker is.
#[allow(clippy::too_many_arguments)]
fn load(
    shared: Arc<Shared>,
    plan: Plan,
    stages: Vec<(crate::plan::Cell, Option<crate::calibrate::Params>)>,
    thresholds: Vec<f64>,
    models: Vec<Option<usize>>,
    (threads, packing): (usize, crate::backend::Packing),
    make_backend: MakeBackend,
    rxs: Vec<mpsc::Receiver<Job>>,
) -> Vec<std::thread::JoinHandle<()>> {
    let fail = |why: String| {
        *shared.detail.lock().expect("not poisoned") = Some(why);
    };
    let mut scorers = Vec::new();
    for (c, calibration) in stages {
        match Scorer::new(&plan, &c, &|k| shared.storage.vector(k), calibration) {
            Ok(s) => {
                let worker = models
                    .iter()
                    .position(|m| *m == c.model())
                    .expect("every stage's model has a worker");
                scorers.push((s, worker));
            }
            Err(e) => {
                fail(e.to_string());
                return Vec::new();
            }
        }
    }
    let embedder = scorers[0].0.embedder.as_ref().and_then(|e| {
        let known = &plan.embedders[e.index];
        known.file.as_ref().map(|f| EmbedderLoad {
            id: known.id.clone(),
            path: f.path.clone(),
            max_tokens: plan.spec.embedders[e.index].max_tokens,
            threads,
        })
    });
    let mut handles = Vec::new();
    let mut readies = Vec::new();
    for (w, (model, rx)) in models.iter().zip(rxs).enumerate() {
        let model = model.and_then(|m| {
            plan.models[m].file.as_ref().map(|f| ModelLoad {
                id: plan.models[m].id.clone(),
                path: f.path.clone(),
                n_ctx: f.n_ctx,
                threads,
                packing,
                server: f.server.clone(),
            })
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        handles.push(worker::spawn(
            format!("pipeline-serve-{w}"),
            WorkerSpec {
                model,
                embedder: if w == 0 { embedder.clone() } else { None },
                prompts: plan.prompts.clone(),
            },
            make_backend.clone(),
            rx,
            ready_tx,
        ));
        readies.push(ready_rx);
    }
    for ready in readies {
        match ready.blocking_recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                fail(e.to_string());
                return handles;
            }
            Err(_) => {
                fail("the model worker stopped".into());
                return handles;
            }
        }
    }
    *shared.served.lock().expect("not poisoned") = Some(Arc::new(Served {
        stages: scorers,
        thresholds,
    }));
    *shared.detail.lock().expect("not poisoned") = None;
    shared.ready.store(true, Ordering::SeqCst);
    handles
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// `?k=`: how many similar rows.
#[derive(Debug, serde::Deserialize)]
struct SimilarQuery {
    k: Option<String>,
}

fn similar_k(q: &SimilarQuery) -> Result<usize, ApiError> {
    match &q.k {
        None => Ok(3),
        Some(s) => match s.parse::<usize>() {
            Ok(k) if k <= 100 => Ok(k),
            _ => Err(ApiError::unprocessable(
                "k",
                "k must be a whole number from 0 to 100",
            )),
        },
    }
}

/// Classify one text.
#[utoipa::path(
    post,
    path = "/v1/classify",
    request_body = ClassifyRequest,
    params(("k" = Option<usize>, Query, description = "similar rows to return (default 3, at most 100)")),
    responses(
        (status = 200, body = ClassifyResponse),
        (status = 400, description = "the body is not JSON", body = ApiError),
        (status = 413, description = "the body is over the limit", body = ApiError),
        (status = 422, description = "a field is missing, empty, not UTF-8 or out of range", body = ApiError),
        (status = 429, description = "the queue is full (see Retry-After)", body = ApiError),
        (status = 503, description = "the model is still loading", body = ApiError)
    )
)]
async fn classify(
    State(s): State<Arc<Shared>>,
    Query(q): Query<SimilarQuery>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let start = Instant::now();
    let result = async {
        let (k, req): (_, ClassifyRequest) = request(&q, body, TEXT)?;
        answer(&s, req.text, TEXT, k, start).await
    }
    .await;
    finish(&s, "classify", start, result.map(axum::Json))
}

/// Classify several texts (at most `--max-batch`).
#[utoipa::path(
    post,
    path = "/v1/classify/batch",
    request_body = ClassifyBatchRequest,
    responses(
        (status = 200, body = ClassifyBatchResponse),
        (status = 413, description = "the body or the number of rows is over the limit", body = ApiError),
        (status = 422, description = "a text is missing, empty or not UTF-8", body = ApiError),
        (status = 429, description = "the queue is full", body = ApiError),
        (status = 503, description = "the model is still loading", body = ApiError)
    )
)]
async fn classify_batch(
    State(s): State<Arc<Shared>>,
    Query(q): Query<SimilarQuery>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let start = Instant::now();
    let result = async {
        let (k, req): (_, ClassifyBatchRequest) = request(&q, body, "rows")?;
        let texts = req.rows.into_iter().map(|r| r.text).collect();
        let results = answer_batch(&s, texts, ("rows", TEXT), k).await?;
        Ok(axum::Json(ClassifyBatchResponse { results }))
    }
    .await;
    finish(&s, "classify_batch", start, result)
}

/// The field a single request's text comes in.
const TEXT: &str = "text";
/// The same in the seed notebook's API.
const SEED_TEXT: &str = "review_text";

/// The seed notebook's `/v1/sentiment`: [`classify`] under its field names.
#[utoipa::path(
    post,
    path = "/v1/sentiment",
    request_body = SentimentRequest,
    params(("k" = Option<usize>, Query, description = "similar rows to return (default 3, at most 100)")),
    responses((status = 200, body = SentimentResponse), (status = 422, description = "as /v1/classify", body = ApiError))
)]
async fn sentiment(
    State(s): State<Arc<Shared>>,
    Query(q): Query<SimilarQuery>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let start = Instant::now();
    let result = async {
        let (k, req): (_, SentimentRequest) = request(&q, body, SEED_TEXT)?;
        answer(&s, req.review_text, SEED_TEXT, k, start).await
    }
    .await;
    finish(
        &s,
        "sentiment",
        start,
        result.map(|r| axum::Json(SentimentResponse::from(r))),
    )
}

/// The seed notebook's `/v1/sentiment/batch`: [`classify_batch`] under its field names.
#[utoipa::path(
    post,
    path = "/v1/sentiment/batch",
    request_body = SentimentBatchRequest,
    responses((status = 200, body = SentimentBatchResponse), (status = 422, description = "as /v1/classify/batch", body = ApiError))
)]
async fn sentiment_batch(
    State(s): State<Arc<Shared>>,
    Query(q): Query<SimilarQuery>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    const LIST: &str = "reviews";
    let start = Instant::now();
    let result = async {
        let (k, req): (_, SentimentBatchRequest) = request(&q, body, LIST)?;
        let texts = req.reviews.into_iter().map(|r| r.review_text).collect();
        let results = answer_batch(&s, texts, (LIST, SEED_TEXT), k).await?;
        let results = results.into_iter().map(SentimentResponse::from).collect();
        Ok(axum::Json(SentimentBatchResponse { results }))
    }
    .await;
    finish(&s, "batch", start, result)
}

/// Answer the texts of a batch in turn; `fields`: the list's field and each item's text
/// field, to name the one at fault in an error.
async fn answer_batch(
    s: &Arc<Shared>,
    texts: Vec<String>,
    (list, field): (&'static str, &'static str),
    k: usize,
) -> Result<Vec<ClassifyResponse>, ApiError> {
    if texts.len() > s.max_batch {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("at most {} rows per batch", s.max_batch),
            Some(list),
        ));
    }
    let mut results = Vec::with_capacity(texts.len());
    for (i, text) in texts.into_iter().enumerate() {
        let one = answer(s, text, field, k, Instant::now())
            .await
            .map_err(|mut e| {
                if e.field.as_deref() == Some(field) {
                    e.field = Some(format!("{list}[{i}].{field}"));
                }
                e
            })?;
        results.push(one);
    }
    Ok(results)
}

/// What every classify endpoint reads: `?k=` and the body as `T` (errors name `field`
/// where the body does not say which).
fn request<T: serde::de::DeserializeOwned>(
    q: &SimilarQuery,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
    field: &str,
) -> Result<(usize, T), ApiError> {
    let k = similar_k(q)?;
    Ok((k, api::parse_body(&body.map_err(too_large)?, field)?))
}

fn too_large(e: axum::extract::rejection::BytesRejection) -> ApiError {
    ApiError::new(e.status(), e.body_text(), None)
}

fn finish<T: IntoResponse>(
    s: &Shared,
    endpoint: &str,
    start: Instant,
    r: Result<T, ApiError>,
) -> Response {
    let response = match r {
        Ok(v) => v.into_response(),
        Err(e) => e.into_response(),
    };
    let t = &s.telemetry;
    t.requests
        .with_label_values(&[endpoint, response.status().as_str()])
        .inc();
    t.latency
        .with_label_values(&[endpoint])
        .observe(start.elapsed().as_secs_f64());
    t.queue_depth.set(s.queue_depth());
    response
}

/// Send a job to a worker, or 429 when its queue is full.
async fn ask<T>(
    s: &Shared,
    worker: usize,
    job: impl FnOnce(oneshot::Sender<T>) -> Job,
) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    s.jobs[worker].try_send(job(tx)).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => ApiError::busy(),
        mpsc::error::TrySendError::Closed(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is stopping",
            None,
        ),
    })?;
    s.telemetry.queue_depth.set(s.queue_depth());
    rx.await.map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model worker stopped",
            None,
        )
    })
}

/// Answer one text; `field` names it in errors.
async fn answer(
    s: &Arc<Shared>,
    input: String,
    field: &'static str,
    k: usize,
    start: Instant,
) -> Result<ClassifyResponse, ApiError> {
    let served = s
        .served
        .lock()
        .expect("not poisoned")
        .clone()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the model is still loading",
                None,
            )
        })?;
    if let Some((at, c)) = input
        .char_indices()
        .find(|(_, c)| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        return Err(ApiError::unprocessable(
            field,
            format!(
                "{field} has the control character U+{:04X} at byte {at}: send text (tabs and line breaks are fine)",
                u32::from(c)
            ),
        ));
    }
    let first = served.first();
    let text = first.clean(&input);
    if text.is_empty() {
        return Err(ApiError::unprocessable(field, format!("{field} is empty")));
    }
    // The text's embedding (one embedder serves every stage): from the store, else
    // computed by the first worker (and stored).
    let needs_vector = served
        .stages
        .iter()
        .enumerate()
        .any(|(i, (sc, _))| sc.needs_vector(i == 0 && k > 0));
    let vector = match first.embedder.as_ref().filter(|_| needs_vector) {
        None => None,
        Some(e) => {
            let key = (e.key_of)(&text);
            match s.storage.vector(&key) {
                Some(v) => Some(v),
                None => {
                    let texts = vec![text.clone()];
                    let mut v = ask(s, 0, |reply| Job::Embed { texts, reply })
                        .await?
                        .map_err(|e| {
                            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None)
                        })?
                        .remove(0);
                    v.shrink_to_fit();
                    if let Some(key) = key
                        && s.storage.add_vector(key, v.clone())
                    {
                        s.batch_due.notify_one();
                    }
                    Some(v)
                }
            }
        }
    };
    // Each stage in turn; a cascade goes on while the stage is unsure.
    let mut cached = true;
    let mut went = Vec::new();
    let mut answered = None;
    for (i, (scorer, worker)) in served.stages.iter().enumerate() {
        let prepared = scorer
            .prepare(text.clone(), vector.as_deref())
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None))?;
        let (logprobs, raw, hit) =
            stage_output(s, scorer, *worker, &text, &prepared, field).await?;
        cached &= hit;
        let a = scorer.answer(
            logprobs.as_deref(),
            raw.as_deref(),
            prepared.vote.as_deref(),
        );
        went.push(scorer.cell.clone());
        let sure = served.thresholds.get(i).is_none_or(|t| a.margin() >= *t);
        if sure {
            answered = Some((i, a, prepared));
            break;
        }
    }
    let (stage, a, prepared) = answered.expect("the last stage always answers");
    let similar = match (&vector, k) {
        (Some(v), k) if k > 0 => first.similar(&text, v, k),
        _ => Vec::new(),
    };
    let similar_row = |(row, sim): (crate::dataset::Row, f32)| SimilarRow {
        id: row.id,
        text: row.text,
        label: first.labels[row.label].clone(),
        similarity: sim,
    };
    let examples_shown = prepared
        .shown
        .map(|sh| {
            sh.ids
                .into_iter()
                .zip(sh.similarity)
                .zip(sh.examples)
                .map(|((id, similarity), e)| SimilarRow {
                    id,
                    text: e.text,
                    label: e.label,
                    similarity,
                })
                .collect()
        })
        .unwrap_or_default();
    let cascade = served.stages.len() > 1;
    Ok(ClassifyResponse {
        label: a.label,
        confidence: a.confidence,
        label_probs: a.label_probs.map(|v| v.into_iter().collect()),
        raw_answer: a.raw_answer,
        similar: similar.into_iter().map(similar_row).collect(),
        examples_shown,
        cell: s.cell.clone(),
        cascade_stage: cascade.then_some(stage),
        stages: if cascade { went } else { Vec::new() },
        cached,
        latency_ms: start.elapsed().as_secs_f64() * 1000.0,
    })
}

/// One stage's raw output for a text: its label log-probs and generated text (none for a
/// vote), from the row cache or computed by the stage's worker (and stored); and whether
/// it came from the cache.
async fn stage_output(
    s: &Arc<Shared>,
    scorer: &Scorer,
    worker: usize,
    text: &str,
    prepared: &scorer::Prepared,
    field: &'static str,
) -> Result<(Option<Vec<f64>>, Option<String>, bool), ApiError> {
    let (
        Some(key),
        Some(components),
        Some(messages),
        Kind::Llm {
            prompt,
            task,
            prompt_limit,
            ..
        },
    ) = (
        &prepared.key,
        &prepared.components,
        &prepared.messages,
        &scorer.kind,
    )
    else {
        // A vote: no model, nothing cached.
        return Ok((None, None, false));
    };
    if let Some((lp, raw)) = s.storage.row(key, *prompt_limit) {
        s.telemetry.cache_hits.inc();
        return Ok((lp, raw, true));
    }
    s.telemetry.cache_misses.inc();
    let item = InferItem {
        text: text.to_string(),
        messages: messages.clone(),
        examples: prepared.examples.clone(),
    };
    // Seeded per row as `run` seeds it, so a served row is the study's row.
    let (prompt, task) = (*prompt, task.clone().for_row(&components.prompt));
    // The computation and its storing run on a task of their own: a client that gives up
    // (a timeout, a closed connection) drops this request, not the work it queued, so the
    // row is finished and cached and the client's retry is answered from the cache.
    let computing = Computing::start(s);
    let (cell, kind) = (scorer.cell.clone(), task.kind());
    let (key, components) = (*key, *components);
    let row_text = prepared.text.clone();
    let computed = tokio::spawn(async move {
        let shared = &computing.0;
        let out = ask(shared, worker, |reply| Job::Infer {
            item,
            prompt,
            task,
            reply,
        })
        .await?
        .map_err(|e| {
            if matches!(e, crate::backend::BackendError::ContextOverflow { .. }) {
                ApiError::unprocessable(field, e.to_string())
            } else {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None)
            }
        })?;
        let row = served_row(cell, kind, key, components, &row_text, &out);
        let answer = (row.logprobs.clone(), row.text.clone());
        if shared.storage.add_row(row) {
            shared.batch_due.notify_one();
        }
        shared.telemetry.rows_stored.inc();
        Ok::<_, ApiError>(answer)
    });
    let answer = computed.await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the request's task failed: {e}"),
            None,
        )
    })??;
    Ok((answer.0, answer.1, false))
}

/// A served answer as a cache row: the same key and content as `pipeline run` would store.
fn served_row(
    cell: String,
    kind: crate::row::TaskKind,
    key: crate::key::Digest,
    components: crate::key::Components,
    text: &str,
    out: &crate::backend::PromptOutput,
) -> CachedRow {
    let o = &out.tasks[0];
    CachedRow {
        key,
        components,
        row_id: format!(
            "served:{}",
            blake3::hash(text.as_bytes())
                .to_hex()
                .as_str()
                .get(..16)
                .unwrap_or("")
        ),
        cell_id: cell,
        kind,
        text: o.text.clone(),
        logprobs: o.logprobs.clone(),
        hidden: o.hidden.clone().map(crate::cache::stored_hidden),
        choice_tokens: o.choice_tokens.clone(),
        prefix_tokens: out.prefix_tokens,
        prompt_tokens: out.prompt_tokens,
        evaluated_tokens: out.evaluated_tokens,
        gen_tokens: o.gen_tokens,
        finish: o.finish,
        prefill_ms: out.prefill_ms,
        shared_by: 1,
        decode_ms: o.decode_ms,
        created_unix_ms: crate::exec::now_unix_ms(),
        error: None,
        host: Some(crate::row::this_host()),
        shard: None,
    }
}

/// Ready (200) once the model is loaded, else 503.
#[utoipa::path(get, path = "/health", responses((status = 200, body = Health), (status = 503, body = Health)))]
async fn health(State(s): State<Arc<Shared>>) -> Response {
    let ready = s.ready.load(Ordering::SeqCst);
    let detail = s.detail.lock().expect("not poisoned").clone();
    let status = if ready {
        "ok"
    } else if detail.as_deref() == Some("loading the model") {
        "loading"
    } else {
        "failed"
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        axum::Json(Health {
            status: status.into(),
            cell: s.cell.clone(),
            detail,
        }),
    )
        .into_response()
}

/// Prometheus text: requests by endpoint and status, a latency histogram, the queue depth,
/// cache hits and misses.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    s.telemetry.queue_depth.set(s.queue_depth());
    let mut buf = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&s.telemetry.registry.gather(), &mut buf);
    (
        [("content-type", "text/plain; version=0.0.4")],
        String::from_utf8_lossy(&buf).into_owned(),
    )
        .into_response()
}
