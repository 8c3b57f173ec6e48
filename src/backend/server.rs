//! Models behind an OpenAI-compatible server (llama-server, vLLM, Ollama, hosted APIs).
//!
//! The row cache, cells and report are the same as for in-process models; what differs is
//! how a prompt reaches the model. With `api: completions` (the default) the tool applies
//! the chat template itself (llama.cpp's own template code, on the template the server
//! reports or one the spec names) and sends the text, so the server sees the tokens the
//! in-process engine would. Log-likelihoods come from llama-server's next-token
//! distribution (`n_probs`, chained over a label's tokens) or from a completions endpoint
//! that echoes the prompt's log-probs (vLLM). Requests go with the prompt cache off, so a
//! one-slot llama-server evaluates each row alone (bit-exact); a server with several slots
//! may batch requests together, so its floats depend on what else ran: run.json and the
//! report say which.
//!
//! Requests run `concurrency` at a time; a 429, a 5xx, a timeout or a dropped connection is
//! retried with exponential backoff and jitter (honouring `Retry-After`), then the row is a
//! failed row naming the URL and the status, and the run goes on. The API key is read from
//! the environment when a session opens and goes into request headers only.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::blocking::Client;
use serde_json::{Value, json};

use super::{
    BackendError, ChatPrompt, Finish, PromptOutput, Session, Task, TaskOutput, TextBudget,
};
use crate::prompt::Messages;
use crate::spec::{ServerApi, ServerSpec};

/// The largest response body read (a full next-token distribution of a 256k vocabulary is
/// about 20 MB of JSON).
const MAX_BODY_BYTES: usize = 64 << 20;
/// Top log-probs asked for first; a label token outside them asks for the whole vocabulary.
const FIRST_TOP_N: usize = 64;
/// Backoff: first wait, and the longest.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(20);

/// Which kind of server answers: llama.cpp's own (its `/props`, `/tokenize` and `n_probs`
/// are used) or any other OpenAI-compatible one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerKind {
    LlamaServer,
    OpenAi,
}

impl ServerKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ServerKind::LlamaServer => "llama-server",
            ServerKind::OpenAi => "openai-compatible",
        }
    }
}

/// What a server says it is: the part of every row key that names the model and engine.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerIdentity {
    pub kind: ServerKind,
    /// The model id the server reports (the spec's `model`, checked against its list).
    pub model: String,
    /// The server's build or version, where it says.
    pub build: Option<String>,
    /// The model file the server loaded, where it says (llama-server's `model_path`).
    pub model_file: Option<String>,
    /// Slots that may decode requests together (llama-server's `total_slots`).
    pub slots: Option<u32>,
    /// Whether llama-server keeps prompts in its RAM prompt cache (`--cache-ram`, seen by
    /// asking it): a row may then reuse another request's evaluation.
    pub ram_prompt_cache: Option<bool>,
    pub n_ctx: Option<u32>,
    pub n_vocab: Option<u32>,
    /// The chat template the tool applies (the spec's file, else the server's).
    #[serde(skip)]
    pub chat_template: Option<String>,
}

impl ServerIdentity {
    /// The model part of a row key: what the server reports about the model, and the chat
    /// template applied to its prompts.
    pub fn model_digest(&self) -> String {
        let mut h = blake3::Hasher::new();
        for part in [
            "pipeline-served-model",
            self.kind.as_str(),
            &self.model,
            self.model_file.as_deref().unwrap_or(""),
            &self.n_vocab.map(|n| n.to_string()).unwrap_or_default(),
            self.chat_template.as_deref().unwrap_or(""),
        ] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().to_hex().to_string()
    }

    /// The engine part of a row key: the server's build and the endpoint used.
    pub fn engine(&self, api: ServerApi) -> String {
        format!(
            "{} {}; api {}",
            self.kind.as_str(),
            self.build.as_deref().unwrap_or("(build not reported)"),
            api.as_str()
        )
    }

    /// Whether a row's numbers depend on its prompt alone: a llama-server with one slot
    /// decodes one request at a time, and every request is sent with its prompt cache off
    /// (`cache_prompt: false`), so nothing another row left behind is reused.
    pub fn bit_exact(&self) -> bool {
        self.kind == ServerKind::LlamaServer
            && self.slots == Some(1)
            && self.ram_prompt_cache == Some(false)
    }

    /// What a served row's numbers depend on besides its prompt.
    pub fn exactness(&self) -> String {
        match (self.kind, self.slots) {
            (ServerKind::LlamaServer, Some(1)) if self.ram_prompt_cache == Some(false) => {
                "one slot and no RAM prompt cache: each row is evaluated alone, in the in-process engine's layout".into()
            }
            (ServerKind::LlamaServer, Some(1)) => {
                "its RAM prompt cache may serve a row another request's evaluation (start it with --cache-ram 0)".into()
            }
            (_, Some(n)) => format!("{n} slots may decode requests together in one batch"),
            (_, None) => "the server may decode requests together in one batch".into(),
        }
    }
}

/// A served model, resolved: the spec and what the server reported at plan time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerModel {
    pub spec: ServerSpec,
    pub identity: ServerIdentity,
}

/// Why a served model cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Request(#[from] RequestFailure),
    #[error("the environment variable {0} (`api_key_env`) is not set")]
    MissingKey(String),
    #[error("cannot make an HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("the server at {url} does not list the model `{name}`; it lists: {listed}")]
    ModelNotListed {
        url: String,
        name: String,
        listed: String,
    },
    #[error("the server at {0} lists no models; name one in `model`")]
    NoModels(String),
    #[error(
        "the server at {0} reports no chat template: name one in `template` (a Jinja file), or use `api: chat`"
    )]
    NoTemplate(String),
}

/// Ask the server what it serves (no inference). llama-server: `/props` and `/v1/models`;
/// others: `/models`.
pub fn probe(spec: &ServerSpec) -> Result<ServerIdentity, ServerError> {
    let client = Requests::new(spec, spec.timeout_s.min(30))?;
    let models = client.get(&format!("{}/models", spec.url))?;
    let listed: Vec<&Value> = models["data"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let ids: Vec<&str> = listed.iter().filter_map(|m| m["id"].as_str()).collect();
    let props = client.props();
    let (model, entry) = match &spec.model {
        Some(name) => match listed.iter().find(|m| m["id"].as_str() == Some(name)) {
            Some(m) => (name.clone(), Some(*m)),
            // llama-server answers for its one model whatever name a request carries.
            None if ids.len() == 1 && props.is_some() => (name.clone(), listed.first().copied()),
            None => {
                return Err(ServerError::ModelNotListed {
                    url: spec.url.clone(),
                    name: name.clone(),
                    listed: if ids.is_empty() {
                        "nothing".to_string()
                    } else {
                        ids.join(", ")
                    },
                });
            }
        },
        None => match ids.first() {
            Some(id) => (id.to_string(), listed.first().copied()),
            None => {
                return Err(ServerError::NoModels(spec.url.clone()));
            }
        },
    };
    let n_vocab = entry
        .and_then(|e| e["meta"]["n_vocab"].as_u64())
        .map(|n| n as u32);
    let identity = match props {
        Some(p) => ServerIdentity {
            kind: ServerKind::LlamaServer,
            model,
            build: p["build_info"].as_str().map(str::to_string),
            model_file: p["model_path"].as_str().map(str::to_string),
            slots: p["total_slots"].as_u64().map(|n| n as u32),
            ram_prompt_cache: client.ram_prompt_cache(),
            n_ctx: p["default_generation_settings"]["n_ctx"]
                .as_u64()
                .map(|n| n as u32),
            n_vocab,
            chat_template: spec
                .template
                .clone()
                .or_else(|| p["chat_template"].as_str().map(str::to_string)),
        },
        None => {
            let version = client
                .get(&format!("{}/version", client.root))
                .ok()
                .and_then(|v| v["version"].as_str().map(str::to_string));
            ServerIdentity {
                kind: ServerKind::OpenAi,
                model,
                build: version,
                model_file: None,
                slots: None,
                ram_prompt_cache: None,
                n_ctx: entry
                    .and_then(|e| e["max_model_len"].as_u64())
                    .map(|n| n as u32),
                n_vocab,
                chat_template: spec.template.clone(),
            }
        }
    };
    if spec.api == ServerApi::Completions && identity.chat_template.is_none() {
        return Err(ServerError::NoTemplate(spec.url.clone()));
    }
    Ok(identity)
}

/// Why a request failed for good.
#[derive(Debug, Clone)]
pub struct RequestFailure {
    url: String,
    status: Option<u16>,
    message: String,
}

impl std::fmt::Display for RequestFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) => write!(f, "{} answered HTTP {s}: {}", self.url, self.message),
            None => write!(f, "{}: {}", self.url, self.message),
        }
    }
}

impl std::error::Error for RequestFailure {}

impl From<RequestFailure> for BackendError {
    fn from(f: RequestFailure) -> Self {
        BackendError::Server {
            url: f.url,
            status: f.status,
            message: f.message,
        }
    }
}

/// HTTP requests to one server, retried as the module says.
struct Requests {
    http: Client,
    /// The API's base URL (`.../v1`).
    base: String,
    /// The server's root (the base without a trailing `/v1`): llama-server's own endpoints.
    root: String,
    key: Option<String>,
    retries: u32,
    /// Set when a request gave up on an unreachable server: later requests try once until
    /// one succeeds, so a stopped server fails its rows quickly instead of each backing off.
    down: AtomicBool,
    /// Spreads the jitter of requests that fail together.
    attempts: AtomicUsize,
}

impl Requests {
    fn new(spec: &ServerSpec, timeout_s: u64) -> Result<Self, ServerError> {
        let key = match &spec.api_key_env {
            Some(var) => {
                Some(std::env::var(var).map_err(|_| ServerError::MissingKey(var.clone()))?)
            }
            None => None,
        };
        let http = Client::builder()
            .timeout(Duration::from_secs(timeout_s))
            .connect_timeout(Duration::from_secs(timeout_s.min(10)))
            .build()
            .map_err(ServerError::Client)?;
        let root = spec
            .url
            .strip_suffix("/v1")
            .unwrap_or(&spec.url)
            .to_string();
        Ok(Self {
            http,
            base: spec.url.clone(),
            root,
            key,
            retries: spec.retries,
            down: AtomicBool::new(false),
            attempts: AtomicUsize::new(0),
        })
    }

    /// llama-server's `/props`, if this is one.
    fn props(&self) -> Option<Value> {
        let p = self.get(&format!("{}/props", self.root)).ok()?;
        (p.get("build_info").is_some() || p.get("default_generation_settings").is_some())
            .then_some(p)
    }

    /// Whether llama-server restores prompts from its RAM prompt cache: evaluate one
    /// prompt, another, then the first again with the cache allowed, and see whether it
    /// was evaluated again.
    fn ram_prompt_cache(&self) -> Option<bool> {
        let url = format!("{}/completion", self.root);
        let first: Vec<i64> = (1..=16).collect();
        let other: Vec<i64> = (17..=32).collect();
        for (prompt, cache) in [(&first, false), (&other, false)] {
            self.post(
                &url,
                &json!({"prompt": prompt, "n_predict": 0, "cache_prompt": cache}),
            )
            .ok()?;
        }
        let again = self
            .post(
                &url,
                &json!({"prompt": first, "n_predict": 0, "cache_prompt": true}),
            )
            .ok()?;
        let evaluated = again["timings"]["prompt_n"].as_u64()?;
        Some(evaluated < first.len() as u64)
    }

    fn get(&self, url: &str) -> Result<Value, RequestFailure> {
        self.send(url, None)
    }

    fn post(&self, url: &str, body: &Value) -> Result<Value, RequestFailure> {
        self.send(url, Some(body))
    }

    fn send(&self, url: &str, body: Option<&Value>) -> Result<Value, RequestFailure> {
        let fail = |status: Option<u16>, message: String| RequestFailure {
            url: url.to_string(),
            status,
            message,
        };
        let retries = if self.down.load(Ordering::Relaxed) {
            0
        } else {
            self.retries
        };
        let mut attempt = 0;
        loop {
            let mut req = match body {
                Some(b) => self.http.post(url).json(b),
                None => self.http.get(url),
            };
            if let Some(k) = &self.key {
                req = req.bearer_auth(k);
            }
            let (failure, retry_after, unreachable) = match req.send() {
                Ok(resp) => {
                    let status = resp.status();
                    let retry_after = retry_after(&resp);
                    match read_body(resp) {
                        Ok(bytes) if status.is_success() => {
                            self.down.store(false, Ordering::Relaxed);
                            return serde_json::from_slice(&bytes).map_err(|e| {
                                fail(
                                    Some(status.as_u16()),
                                    format!("the answer is not JSON: {e}"),
                                )
                            });
                        }
                        Ok(bytes) => {
                            let f = fail(Some(status.as_u16()), snippet(&bytes));
                            if !retryable(status) {
                                return Err(f);
                            }
                            (f, retry_after, false)
                        }
                        Err(e) => (
                            fail(Some(status.as_u16()), e.to_string()),
                            retry_after,
                            false,
                        ),
                    }
                }
                Err(e) => {
                    let what = if e.is_timeout() {
                        "timed out"
                    } else if e.is_connect() {
                        "cannot connect"
                    } else {
                        "the connection failed"
                    };
                    (
                        fail(None, format!("{what}: {}", error_chain(&e))),
                        None,
                        e.is_connect(),
                    )
                }
            };
            if attempt >= retries {
                if unreachable {
                    self.down.store(true, Ordering::Relaxed);
                }
                let mut f = failure;
                if attempt > 0 {
                    f.message = format!("{} (after {} attempts)", f.message, attempt + 1);
                }
                return Err(f);
            }
            std::thread::sleep(self.backoff(attempt, retry_after));
            attempt += 1;
        }
    }

    /// Exponential backoff with full jitter in [½, 1] of the step, at least `Retry-After`.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let step = BACKOFF_BASE
            .saturating_mul(1u32 << attempt.min(16))
            .min(BACKOFF_CAP);
        let n = self.attempts.fetch_add(1, Ordering::Relaxed);
        let seed = blake3::hash(
            &[
                &n.to_le_bytes()[..],
                &Instant::now().elapsed().as_nanos().to_le_bytes()[..],
                &std::process::id().to_le_bytes()[..],
            ]
            .concat(),
        );
        let unit =
            f64::from(u16::from_le_bytes([seed.as_bytes()[0], seed.as_bytes()[1]])) / 65535.0;
        let jittered = step.mul_f64(0.5 + 0.5 * unit);
        jittered.max(retry_after.unwrap_or_default().min(BACKOFF_CAP * 3))
    }
}

fn retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
}

/// `Retry-After` in seconds (the HTTP-date form is rare from APIs and is ignored).
fn retry_after(resp: &reqwest::blocking::Response) -> Option<Duration> {
    let v = resp.headers().get(reqwest::header::RETRY_AFTER)?;
    let secs: f64 = v.to_str().ok()?.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

/// An answer that could not be read whole.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the answer broke off: {0}")]
    BrokeOff(#[source] std::io::Error),
    #[error("the answer is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
}

fn read_body(resp: reqwest::blocking::Response) -> Result<Vec<u8>, BodyError> {
    use std::io::Read;
    let mut out = Vec::new();
    resp.take(MAX_BODY_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(BodyError::BrokeOff)?;
    if out.len() > MAX_BODY_BYTES {
        return Err(BodyError::TooLarge);
    }
    Ok(out)
}

/// The start of an error body, on one line.
fn snippet(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &one_line[..i]),
        None if one_line.is_empty() => "(empty body)".into(),
        None => one_line,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// `template` (Jinja, or a llama.cpp template name) applied to `m` by llama.cpp's own chat
/// template code, with the assistant turn opened: the in-process engine's rendering.
pub fn apply_template(template: &str, m: &Messages) -> Result<String, BackendError> {
    let bad = |e: &dyn std::fmt::Display| BackendError::ChatTemplate(e.to_string());
    let tmpl = CString::new(template).map_err(|e| bad(&e))?;
    let mut owned = Vec::new();
    if let Some(sys) = &m.system {
        owned.push((c"system", CString::new(sys.as_str()).map_err(|e| bad(&e))?));
    }
    owned.push((c"user", CString::new(m.user.as_str()).map_err(|e| bad(&e))?));
    let chat: Vec<llama_cpp_sys_2::llama_chat_message> = owned
        .iter()
        .map(|(role, content)| llama_cpp_sys_2::llama_chat_message {
            role: role.as_ptr(),
            content: content.as_ptr(),
        })
        .collect();
    let mut len = owned.iter().map(|(_, c)| c.as_bytes().len()).sum::<usize>() * 2 + 256;
    loop {
        let mut buf = vec![0u8; len];
        let cap = i32::try_from(buf.len()).map_err(|e| bad(&e))?;
        // SAFETY: the template, roles and contents are NUL-terminated strings that outlive
        // the call; `buf` has `cap` writable bytes.
        let n = unsafe {
            llama_cpp_sys_2::llama_chat_apply_template(
                tmpl.as_ptr(),
                chat.as_ptr(),
                chat.len(),
                true,
                buf.as_mut_ptr().cast(),
                cap,
            )
        };
        if n < 0 {
            return Err(BackendError::ChatTemplate(
                "llama.cpp does not know this chat template".into(),
            ));
        }
        let n = n as usize;
        if n <= buf.len() {
            buf.truncate(n);
            return String::from_utf8(buf).map_err(|e| bad(&e));
        }
        len = n;
    }
}

/// Lend a session on a served model to `run` (what [`super::Backend::with_model`] does for
/// a GGUF file).
pub fn with_model(
    server: &ServerModel,
    run: &mut dyn FnMut(&mut dyn Session) -> Result<(), BackendError>,
) -> Result<(), BackendError> {
    let requests =
        Requests::new(&server.spec, server.spec.timeout_s).map_err(|e| BackendError::Load {
            path: server.spec.url.clone().into(),
            reason: e.to_string(),
        })?;
    let mut session = ServerSession {
        server,
        requests,
        prefixes: Mutex::new(HashMap::new()),
    };
    run(&mut session)
}

struct ServerSession<'a> {
    server: &'a ServerModel,
    requests: Requests,
    /// Each template's shared prefix, tokenized.
    prefixes: Mutex<HashMap<String, Vec<i64>>>,
}

/// A row's prompt tokens and shared-prefix length, worked out once for all its tasks.
type Layout = std::cell::OnceCell<(Vec<i64>, usize)>;

impl ServerSession<'_> {
    fn identity(&self) -> &ServerIdentity {
        &self.server.identity
    }

    fn llama(&self) -> bool {
        self.identity().kind == ServerKind::LlamaServer
    }

    /// Token ids of `text` by the server's tokenizer (no BOS, control tokens as text).
    fn tokenize(&self, text: &str, parse_special: bool) -> Result<Vec<i64>, RequestFailure> {
        self.tokenize_with(text, false, parse_special)
    }

    fn tokenize_with(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<i64>, RequestFailure> {
        let answer = if self.llama() {
            self.requests.post(
                &format!("{}/tokenize", self.requests.root),
                &json!({"content": text, "add_special": add_special, "parse_special": parse_special}),
            )?
        } else {
            // vLLM's shape.
            self.requests.post(
                &format!("{}/tokenize", self.requests.root),
                &json!({"model": self.identity().model, "prompt": text, "add_special_tokens": false}),
            )?
        };
        Ok(answer["tokens"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default())
    }

    fn detokenize(&self, tokens: &[i64]) -> Result<String, RequestFailure> {
        let body = if self.llama() {
            json!({"tokens": tokens})
        } else {
            json!({"model": self.identity().model, "tokens": tokens})
        };
        let answer = self
            .requests
            .post(&format!("{}/detokenize", self.requests.root), &body)?;
        Ok(answer["content"]
            .as_str()
            .or_else(|| answer["prompt"].as_str())
            .unwrap_or_default()
            .to_string())
    }

    fn template(&self) -> Result<&str, BackendError> {
        self.identity()
            .chat_template
            .as_deref()
            .ok_or_else(|| BackendError::ChatTemplate("the server reports no chat template".into()))
    }

    /// A message text must not become a control token on the server either: where its
    /// tokens differ with control tokens parsed, it spells one.
    fn check_texts_are_data(&self, m: &Messages) -> Result<(), BackendError> {
        if !self.llama() {
            return Ok(());
        }
        for text in m.system.iter().chain([&m.user]) {
            if !text.contains(['<', '[', '|']) {
                continue;
            }
            if self.tokenize(text, true)? != self.tokenize(text, false)? {
                return Err(BackendError::Job(format!(
                    "the text spells a control token of the served model; sent as text, the server would parse it as one ({})",
                    self.server.spec.url
                )));
            }
        }
        Ok(())
    }

    /// llama-server: the prompt's tokens, its fixed prefix already in the slot's KV cache.
    /// llama.cpp's log-probs move with the ubatch split (by up to 0.3 nats), so a row is
    /// evaluated in the in-process engine's layout: the prefix every row of the template
    /// shares (its tokens less the last, as the engine counts it) alone with the cache off,
    /// then the rest reusing it.
    fn primed(&self, prompt: &ChatPrompt, layout: &Layout) -> Result<Primed, BackendError> {
        if layout.get().is_none() {
            let _ = layout.set(self.layout(prompt)?);
        }
        let (tokens, fixed) = layout.get().expect("set above").clone();
        let mut usage = Usage {
            prompt_tokens: tokens.len() as u32,
            ..Usage::default()
        };
        if fixed > 0 {
            let answer = self.requests.post(
                &self.completion_url(),
                &json!({"prompt": &tokens[..fixed], "n_predict": 0, "cache_prompt": false}),
            )?;
            let u = Usage::of(&answer);
            usage.evaluated_tokens = u.evaluated_tokens;
            usage.prompt_ms = u.prompt_ms;
        }
        Ok(Primed {
            tokens,
            reuse: fixed > 0,
            usage,
        })
    }

    /// The prompt's tokens and how many of them every row of its template shares. The
    /// shared prefix is tokenized once per template, the prompt once per row.
    fn layout(&self, prompt: &ChatPrompt) -> Result<(Vec<i64>, usize), BackendError> {
        let tokens = self.tokenize_with(&prompt.text, true, true)?;
        if prompt.fixed_text().is_empty() {
            return Ok((tokens, 0));
        }
        let known = self
            .prefixes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(prompt.fixed_text())
            .cloned();
        let prefix = match known {
            Some(p) => p,
            None => {
                let p = self.tokenize_with(prompt.fixed_text(), true, true)?;
                self.prefixes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(prompt.fixed_text().to_string(), p.clone());
                p
            }
        };
        let fixed = super::shared_prefix_tokens(&tokens, &prefix);
        Ok((tokens, fixed))
    }

    fn completion_url(&self) -> String {
        if self.llama() {
            format!("{}/completion", self.requests.root)
        } else {
            format!("{}/completions", self.requests.base)
        }
    }

    /// One task of a row. `after_prompt`: the prompt's tokens and the next-token
    /// distribution after them, once a request has returned it (asked of the first
    /// generation when `wants_distribution`).
    fn run_task(
        &self,
        prompt: &ChatPrompt,
        task: &Task,
        wants_distribution: bool,
        layout: &Layout,
        after_prompt: &mut Option<(Vec<i64>, Value)>,
    ) -> Result<(TaskOutput, Usage), BackendError> {
        let start = Instant::now();
        match (task, self.server.spec.api) {
            (Task::Generate { max_tokens, stop, sampler }, api) => {
                let mut primed_usage = None;
                let mut prompt_tokens = None;
                let mut body = json!({
                    "temperature": sampler.temperature,
                    "top_p": sampler.top_p,
                    "seed": sampler.seed,
                    "stop": stop,
                });
                let url = match api {
                    ServerApi::Chat => {
                        let messages: Value = serde_json::from_str(&prompt.text)
                            .map_err(|e| BackendError::Job(e.to_string()))?;
                        body["messages"] = messages;
                        body["model"] = json!(self.identity().model);
                        body["max_tokens"] = json!(max_tokens);
                        format!("{}/chat/completions", self.requests.base)
                    }
                    ServerApi::Completions if self.llama() => {
                        let primed = self.primed(prompt, layout)?;
                        primed_usage = Some(primed.usage);
                        if wants_distribution && after_prompt.is_none() {
                            body["n_probs"] = json!(FIRST_TOP_N);
                            prompt_tokens = Some(primed.tokens.clone());
                        }
                        body["prompt"] = json!(primed.tokens);
                        body["cache_prompt"] = json!(primed.reuse);
                        body["n_predict"] = json!(max_tokens);
                        body["top_k"] = json!(sampler.top_k);
                        body["min_p"] = json!(sampler.min_p);
                        self.completion_url()
                    }
                    ServerApi::Completions => {
                        body["prompt"] = json!(prompt.text);
                        body["model"] = json!(self.identity().model);
                        body["max_tokens"] = json!(max_tokens);
                        if sampler.top_k > 0 {
                            body["top_k"] = json!(sampler.top_k);
                        }
                        self.completion_url()
                    }
                };
                let answer = self.requests.post(&url, &body)?;
                if let Some(tokens) = prompt_tokens {
                    let dist = answer["completion_probabilities"][0]["top_logprobs"].clone();
                    if dist.is_array() {
                        *after_prompt = Some((tokens, dist));
                    }
                }
                let generated = Generated::parse(&answer, self.llama() && api == ServerApi::Completions)
                    .map_err(|m| BackendError::Server {
                        url: url.clone(),
                        status: None,
                        message: m.to_string(),
                    })?;
                Ok((
                    TaskOutput {
                        text: Some(generated.text),
                        logprobs: None,
                        choice_tokens: None,
                        hidden: None,
                        gen_tokens: generated.tokens,
                        finish: generated.finish,
                        decode_ms: start.elapsed().as_secs_f64() * 1000.0,
                    },
                    match primed_usage {
                        Some(mut u) => {
                            u.add(&generated.usage);
                            u
                        }
                        None => generated.usage,
                    },
                ))
            }
            (Task::Loglik { continuations, .. }, ServerApi::Completions) => {
                let (scores, usage) = if self.llama() {
                    self.loglik_next_token(prompt, continuations, layout, after_prompt.clone())?
                } else {
                    self.loglik_echo(prompt, continuations)?
                };
                Ok((
                    TaskOutput {
                        text: None,
                        logprobs: Some(scores.logprobs),
                        choice_tokens: Some(scores.tokens),
                        hidden: None,
                        gen_tokens: 0,
                        finish: Finish::Scored,
                        decode_ms: start.elapsed().as_secs_f64() * 1000.0,
                    },
                    usage,
                ))
            }
            (Task::Loglik { .. }, ServerApi::Chat) => Err(BackendError::Job(
                "a chat endpoint gives no exact log-probs of a label; use `api: completions`".into(),
            )),
            (Task::Hidden { .. }, _) => Err(BackendError::Job(
                "a server does not give a model's hidden states; probes need an in-process (gguf) model".into(),
            )),
        }
    }

    /// llama-server: the next-token distribution after the prompt (and after each of a
    /// label's tokens in turn), read from `n_probs`; exact, as the whole vocabulary's
    /// softmax is taken before the top ones are listed.
    fn loglik_next_token(
        &self,
        prompt: &ChatPrompt,
        continuations: &[String],
        layout: &Layout,
        after_prompt: Option<(Vec<i64>, Value)>,
    ) -> Result<(ChoiceScores, Usage), BackendError> {
        let url = self.completion_url();
        let mut usage = Usage::default();
        let mut out = ChoiceScores::default();
        // The distribution after each prefix of label tokens, asked once.
        let mut seen: Vec<(Vec<i64>, Value)> = Vec::new();
        let mut prompt_tokens = None;
        if let Some((tokens, dist)) = after_prompt {
            seen.push((Vec::new(), dist));
            prompt_tokens = Some(tokens);
        }
        for cont in continuations {
            let tokens = self.tokenize(cont, false)?;
            if tokens.is_empty() {
                return Err(BackendError::Job(format!("label `{cont}` has no tokens")));
            }
            out.tokens.push(tokens.len() as u32);
            let mut lp = 0.0;
            for i in 0..tokens.len() {
                let prefix = &tokens[..i];
                let want = tokens[i];
                let mut found = None;
                for top_n in [FIRST_TOP_N, self.identity().n_vocab.unwrap_or(0) as usize] {
                    if top_n == 0 {
                        continue;
                    }
                    let dist = match seen
                        .iter()
                        .find(|(p, d)| p == prefix && top_len(d) >= top_n)
                    {
                        Some((_, d)) => d.clone(),
                        None => {
                            // Right after the prompt: evaluated in the engine's layout (its
                            // shared prefix first). After some of a label's tokens: the
                            // prompt's evaluation reused, as the engine reuses it.
                            let (mut tokens, reuse) = match (&prompt_tokens, prefix.is_empty()) {
                                (Some(t), false) => (t.clone(), true),
                                _ => {
                                    let primed = self.primed(prompt, layout)?;
                                    usage.add(&primed.usage);
                                    prompt_tokens = Some(primed.tokens.clone());
                                    (primed.tokens, primed.reuse || !prefix.is_empty())
                                }
                            };
                            tokens.extend(prefix);
                            let answer = self.requests.post(
                                &url,
                                &json!({
                                    "prompt": tokens,
                                    "n_predict": 1,
                                    "n_probs": top_n,
                                    "temperature": 0.0,
                                    "cache_prompt": reuse,
                                }),
                            )?;
                            usage.add(&Usage::of(&answer));
                            let dist =
                                answer["completion_probabilities"][0]["top_logprobs"].clone();
                            seen.push((prefix.to_vec(), dist.clone()));
                            dist
                        }
                    };
                    found = dist.as_array().and_then(|a| {
                        a.iter()
                            .find(|e| e["id"].as_i64() == Some(want))
                            .and_then(|e| e["logprob"].as_f64())
                    });
                    if found.is_some() || top_len(&dist) < top_n {
                        break;
                    }
                }
                match found {
                    Some(l) => lp += l,
                    None => {
                        return Err(BackendError::Server {
                            url: url.clone(),
                            status: None,
                            message: format!(
                                "the next-token distribution lacks token {want} of label `{cont}` (n_probs lists fewer than the vocabulary)"
                            ),
                        });
                    }
                }
            }
            out.logprobs.push(lp);
        }
        Ok((out, usage))
    }

    /// A completions endpoint that echoes the prompt's log-probs (vLLM): each label after
    /// the prompt, its tokens' log-probs summed.
    fn loglik_echo(
        &self,
        prompt: &ChatPrompt,
        continuations: &[String],
    ) -> Result<(ChoiceScores, Usage), BackendError> {
        let url = self.completion_url();
        let mut usage = Usage::default();
        let mut out = ChoiceScores::default();
        for cont in continuations {
            let answer = self.requests.post(
                &url,
                &json!({
                    "model": self.identity().model,
                    "prompt": format!("{}{cont}", prompt.text),
                    "max_tokens": 0,
                    "echo": true,
                    "logprobs": 0,
                }),
            )?;
            usage.add(&Usage::of(&answer));
            let lp = &answer["choices"][0]["logprobs"];
            let (Some(offsets), Some(lps)) = (
                lp["text_offset"].as_array(),
                lp["token_logprobs"].as_array(),
            ) else {
                return Err(BackendError::Server {
                    url: url.clone(),
                    status: None,
                    message: "the server does not echo the prompt's log-probs (`echo` with `logprobs`); it gives no exact label log-prob".into(),
                });
            };
            let start = prompt.text.len() as u64;
            let mut sum = 0.0;
            let mut count = 0;
            for (off, l) in offsets.iter().zip(lps) {
                if off.as_u64().is_some_and(|o| o >= start) {
                    sum += l.as_f64().unwrap_or(f64::NEG_INFINITY);
                    count += 1;
                }
            }
            if count == 0 {
                return Err(BackendError::Job(format!("label `{cont}` has no tokens")));
            }
            out.logprobs.push(sum);
            out.tokens.push(count);
        }
        Ok((out, usage))
    }
}

/// Each label's summed log-prob and its number of tokens.
#[derive(Debug, Default)]
struct ChoiceScores {
    logprobs: Vec<f64>,
    tokens: Vec<u32>,
}

fn top_len(dist: &Value) -> usize {
    dist.as_array().map_or(0, Vec::len)
}

/// A prompt ready on llama-server: its tokens, whether the slot holds its fixed prefix, and
/// what putting it there cost.
struct Primed {
    tokens: Vec<i64>,
    reuse: bool,
    usage: Usage,
}

/// Tokens and time the server reports for a request.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    prompt_tokens: u32,
    evaluated_tokens: u32,
    prompt_ms: f64,
}

impl Usage {
    fn of(answer: &Value) -> Self {
        let t = &answer["timings"];
        if t.is_object() {
            let evaluated = t["prompt_n"].as_u64().unwrap_or(0) as u32;
            return Usage {
                prompt_tokens: answer["tokens_evaluated"]
                    .as_u64()
                    .map_or(evaluated, |n| n as u32),
                evaluated_tokens: evaluated,
                prompt_ms: t["prompt_ms"].as_f64().unwrap_or(0.0),
            };
        }
        let n = answer["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as u32;
        Usage {
            prompt_tokens: n,
            evaluated_tokens: n,
            prompt_ms: 0.0,
        }
    }

    fn add(&mut self, other: &Usage) {
        if self.prompt_tokens == 0 {
            self.prompt_tokens = other.prompt_tokens;
        }
        self.evaluated_tokens += other.evaluated_tokens;
        self.prompt_ms += other.prompt_ms;
    }
}

/// An answer without what the request asked for.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct MalformedAnswer(String);

/// A generation as a server returns it.
struct Generated {
    text: String,
    tokens: u32,
    finish: Finish,
    usage: Usage,
}

impl Generated {
    fn parse(answer: &Value, llama: bool) -> Result<Self, MalformedAnswer> {
        if llama {
            let text = answer["content"]
                .as_str()
                .ok_or(MalformedAnswer("the answer has no `content`".into()))?;
            let finish = match answer["stop_type"].as_str() {
                Some("eos") => Finish::Eog,
                Some("word") => Finish::Stop,
                Some("limit") => Finish::Length,
                other => {
                    return Err(MalformedAnswer(format!("unknown stop_type {other:?}")));
                }
            };
            return Ok(Generated {
                text: text.to_string(),
                tokens: answer["tokens_predicted"].as_u64().unwrap_or(0) as u32,
                finish,
                usage: Usage::of(answer),
            });
        }
        let choice = &answer["choices"][0];
        let text = choice["text"]
            .as_str()
            .or_else(|| choice["message"]["content"].as_str())
            .ok_or(MalformedAnswer(
                "the answer has no `choices[0].text` or `choices[0].message.content`".into(),
            ))?;
        let finish = match choice["finish_reason"].as_str() {
            Some("length") => Finish::Length,
            // OpenAI reports a stop string and the end of the turn alike.
            Some(_) | None if choice["stop_reason"].is_string() => Finish::Stop,
            _ => Finish::Eog,
        };
        Ok(Generated {
            text: text.to_string(),
            tokens: answer["usage"]["completion_tokens"].as_u64().unwrap_or(0) as u32,
            finish,
            usage: Usage::of(answer),
        })
    }
}

impl Session for ServerSession<'_> {
    fn truncate(&self, text: &str, budget: TextBudget) -> String {
        let Ok(tokens) = self.tokenize(text, false) else {
            // The prompt goes whole; a server that cannot take it fails the row.
            return text.to_string();
        };
        super::cut_tokens(text, &tokens, budget, |range| {
            self.detokenize(range).unwrap_or_default()
        })
    }

    fn format_chat(&self, m: &Messages) -> Result<ChatPrompt, BackendError> {
        self.check_texts_are_data(m)?;
        match self.server.spec.api {
            ServerApi::Completions => {
                let template = self.template()?;
                let text = apply_template(template, m)?;
                let fixed = apply_template(template, &m.fixed_part())?;
                Ok(ChatPrompt::new(text, &fixed))
            }
            ServerApi::Chat => {
                let mut messages = Vec::new();
                if let Some(s) = &m.system {
                    messages.push(json!({"role": "system", "content": s}));
                }
                messages.push(json!({"role": "user", "content": m.user}));
                Ok(ChatPrompt::new(Value::from(messages).to_string(), ""))
            }
        }
    }

    fn run(&mut self, prompt: &ChatPrompt, tasks: &[Task]) -> Result<PromptOutput, BackendError> {
        self.run_one(prompt, tasks)
    }

    /// `concurrency` prompts in flight at a time, each on its own thread.
    fn run_many(
        &mut self,
        prompts: &[(ChatPrompt, Vec<Task>)],
    ) -> Vec<Result<PromptOutput, BackendError>> {
        let this: &ServerSession<'_> = self;
        let next = AtomicUsize::new(0);
        let results: Vec<std::sync::Mutex<Option<Result<PromptOutput, BackendError>>>> = prompts
            .iter()
            .map(|_| std::sync::Mutex::new(None))
            .collect();
        let threads = this.server.spec.concurrency.min(prompts.len()).max(1);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((p, t)) = prompts.get(i) else { break };
                        let r = this.run_one(p, t);
                        *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                    }
                });
            }
        });
        results
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .unwrap_or_else(|| Err(BackendError::Job("a request thread stopped".into())))
            })
            .collect()
    }
}

impl ServerSession<'_> {
    fn run_one(&self, prompt: &ChatPrompt, tasks: &[Task]) -> Result<PromptOutput, BackendError> {
        let mut outputs: Vec<Option<TaskOutput>> = vec![None; tasks.len()];
        let mut usage = Usage::default();
        // Generations first: the first one's request also returns the distribution after
        // the prompt, evaluated in the engine's layout, which is all a single-token label's
        // log-likelihood needs (the same numbers as a request of its own would give).
        let mut order: Vec<usize> = (0..tasks.len()).collect();
        order.sort_by_key(|&i| !matches!(tasks[i], Task::Generate { .. }));
        let wants_distribution = tasks.iter().any(|t| matches!(t, Task::Loglik { .. }));
        let mut after_prompt = None;
        let layout = Layout::new();
        for i in order {
            let (out, u) = self.run_task(
                prompt,
                &tasks[i],
                wants_distribution,
                &layout,
                &mut after_prompt,
            )?;
            usage.add(&u);
            outputs[i] = Some(out);
        }
        let outputs = outputs.into_iter().flatten().collect();
        Ok(PromptOutput {
            prompt_tokens: usage.prompt_tokens,
            evaluated_tokens: usage.evaluated_tokens,
            prefix_tokens: layout.get().map(|(_, fixed)| *fixed as u32),
            prefill_ms: usage.prompt_ms,
            tasks: outputs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServerSpec {
        ServerSpec {
            url: "http://127.0.0.1:1/v1".into(),
            model: None,
            api_key_env: None,
            concurrency: 1,
            timeout_s: 1,
            retries: 3,
            api: ServerApi::Completions,
            template: None,
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_its_cap_and_waits_at_least_retry_after() {
        let r = Requests::new(&spec(), 1).unwrap();
        assert_eq!(r.root, "http://127.0.0.1:1");
        for attempt in 0..20 {
            let step = BACKOFF_BASE
                .saturating_mul(1 << attempt.min(16))
                .min(BACKOFF_CAP);
            let d = r.backoff(attempt, None);
            assert!(d >= step / 2 && d <= step, "attempt {attempt}: {d:?}");
        }
        let d = r.backoff(0, Some(Duration::from_secs(7)));
        assert!(d >= Duration::from_secs(7));
        // A server asking for an hour is not waited on for an hour.
        assert!(r.backoff(0, Some(Duration::from_secs(3600))) <= BACKOFF_CAP * 3);
    }

    #[test]
    fn llama_server_and_openai_answers_parse_to_text_tokens_and_finish() {
        let llama = json!({"content": " positive", "stop_type": "eos", "tokens_predicted": 2,
            "tokens_evaluated": 40, "timings": {"prompt_n": 12, "prompt_ms": 3.5}});
        let g = Generated::parse(&llama, true).unwrap();
        assert_eq!(
            (g.text.as_str(), g.tokens, g.finish),
            (" positive", 2, Finish::Eog)
        );
        assert_eq!((g.usage.prompt_tokens, g.usage.evaluated_tokens), (40, 12));
        let limit = json!({"content": "a", "stop_type": "limit"});
        assert_eq!(
            Generated::parse(&limit, true).unwrap().finish,
            Finish::Length
        );
        assert!(Generated::parse(&json!({"content": "a", "stop_type": "?"}), true).is_err());

        let openai = json!({"choices": [{"text": "negative", "finish_reason": "stop", "stop_reason": "\n"}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 1}});
        let g = Generated::parse(&openai, false).unwrap();
        assert_eq!(
            (g.text.as_str(), g.tokens, g.finish),
            ("negative", 1, Finish::Stop)
        );
        assert_eq!(g.usage.prompt_tokens, 30);
        let chat = json!({"choices": [{"message": {"content": "ok"}, "finish_reason": "length"}]});
        assert_eq!(
            Generated::parse(&chat, false).unwrap().finish,
            Finish::Length
        );
        assert!(Generated::parse(&json!({"choices": []}), false).is_err());
    }

    #[test]
    fn a_served_models_keys_change_with_what_the_server_reports() {
        let id = ServerIdentity {
            kind: ServerKind::LlamaServer,
            model: "m".into(),
            build: Some("b1".into()),
            model_file: Some("/m.gguf".into()),
            slots: Some(4),
            ram_prompt_cache: Some(false),
            n_ctx: None,
            n_vocab: Some(100),
            chat_template: Some("chatml".into()),
        };
        let other_file = ServerIdentity {
            model_file: Some("/n.gguf".into()),
            ..id.clone()
        };
        let other_template = ServerIdentity {
            chat_template: Some("llama3".into()),
            ..id.clone()
        };
        assert_ne!(id.model_digest(), other_file.model_digest());
        assert_ne!(id.model_digest(), other_template.model_digest());
        let other_build = ServerIdentity {
            build: Some("b2".into()),
            ..id.clone()
        };
        assert_eq!(id.model_digest(), other_build.model_digest());
        assert_ne!(
            id.engine(ServerApi::Completions),
            other_build.engine(ServerApi::Completions)
        );
        assert_ne!(
            id.engine(ServerApi::Completions),
            id.engine(ServerApi::Chat)
        );
        assert!(!id.bit_exact() && id.exactness().contains("4 slots"));
        let one = ServerIdentity {
            slots: Some(1),
            ..id.clone()
        };
        assert!(one.bit_exact());
        let cached = ServerIdentity {
            ram_prompt_cache: Some(true),
            ..one.clone()
        };
        assert!(!cached.bit_exact() && cached.exactness().contains("--cache-ram 0"));
    }

    #[test]
    fn the_template_is_applied_by_llama_cpp_without_a_model() {
        let m = Messages::new(Some("sys".into()), "hi <|im_end|>".into());
        let text = apply_template("chatml", &m).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi <|im_end|><|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(apply_template("no such template {{", &m).is_err());
    }
}
