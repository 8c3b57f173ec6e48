//! Model files: find them (path, `$PIPELINE_MODELS_DIR`, the Hugging Face cache, download),
//! check that they are GGUF, and digest them with sha256 (memoized, see [`crate::digest_memo`]).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::diag::Diagnostic;
pub use crate::digest_memo::sha256_file;
use crate::spec::{ModelSource, ModelSpec};

/// A model ready to load: where its file is and what it contains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    pub id: String,
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub n_ctx: u32,
    /// How it was found, for the report.
    pub found_via: &'static str,
    /// A model behind a server: what the server said it is (`sha256` is then the digest of
    /// that, and `path` the URL).
    pub server: Option<std::sync::Arc<crate::backend::server::ServerModel>>,
}

impl ResolvedModel {
    /// The engine part of this model's row keys: the server's, for a served model; `None`:
    /// the in-process engine's.
    pub fn engine(&self) -> Option<String> {
        self.server.as_ref().map(|s| s.identity.engine(s.spec.api))
    }
}

/// How to reach the Hugging Face hub; `None` fields fall back to hf-hub's own environment
/// handling (`HF_ENDPOINT`, `HF_HUB_CACHE`/`HF_HOME`, `HF_TOKEN`).
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    pub endpoint: Option<String>,
    pub cache_dir: Option<PathBuf>,
    pub retries: Option<usize>,
    pub show_progress: bool,
}

/// Where to look for models, and whether a download is allowed.
#[derive(Debug, Clone, Default)]
pub struct Resolver {
    pub models_dir: Option<PathBuf>,
    pub hub: HubOptions,
    /// Folder of the sha256 memo (inside the cache).
    pub digest_dir: PathBuf,
    /// Read the memo but never write it (commands that must leave the cache untouched).
    pub memo_read_only: bool,
}

/// A model as far as this machine knows it.
#[derive(Debug, Clone)]
pub struct KnownModel {
    pub id: String,
    /// The file, when it is on this machine.
    pub file: Option<ResolvedModel>,
    /// sha256 of the file (from the file, or from the spec when the file is not here yet).
    pub sha256: Option<String>,
    /// Parameter count (from the GGUF header, or the spec where the file is not here or
    /// the model is served): what turns tokens into compute.
    pub parameters: Option<u64>,
    /// The engine's measured speed for this model on this machine, where one was saved.
    pub rate: Option<crate::rate::EngineRate>,
}

pub use crate::gguf::GGUF_MAGIC;

impl Resolver {
    /// The model's file if it is already on this machine (never downloads).
    pub fn locate(&self, spec: &ModelSpec) -> Result<Option<(PathBuf, &'static str)>, Diagnostic> {
        if let ModelSource::Path(p) = &spec.gguf.value
            && p.is_file()
        {
            return Ok(Some((p.clone(), "path")));
        }
        if let (Some(dir), Some(name)) = (&self.models_dir, spec.gguf.value.file_name()) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(Some((p, "the models folder")));
            }
        }
        if let ModelSource::Hub { owner, repo, file } = &spec.gguf.value {
            return match self.hub_fetch(owner, repo, file, true) {
                Ok(p) => Ok(Some((p, "huggingface cache"))),
                Err(HubLookup::NotCached) => Ok(None),
                Err(HubLookup::Failed(msg)) => Err(spec.gguf.error(msg)),
            };
        }
        Ok(None)
    }

    /// Find (or download) the model, check it is GGUF and that its sha256 is the expected one.
    pub fn resolve(&self, spec: &ModelSpec) -> Result<ResolvedModel, Diagnostic> {
        Ok(self
            .resolve_if_available(spec, true)?
            .expect("with downloads allowed a model is found or an error is returned"))
    }

    /// Every model of a spec: found (and downloaded when `download`), checked and digested.
    /// A local path must exist; without `download` a hub model may not be here yet.
    pub fn known_models(
        &self,
        specs: &[ModelSpec],
        download: bool,
    ) -> Result<Vec<KnownModel>, Diagnostic> {
        specs
            .iter()
            .map(|m| {
                let file = self.resolve_if_available(m, download)?;
                let sha256 = file
                    .as_ref()
                    .map(|r| r.sha256.clone())
                    .or_else(|| m.sha256.as_ref().map(|s| s.value.clone()));
                let parameters = parameters(m, file.as_ref())?;
                Ok(KnownModel {
                    id: m.id.clone(),
                    file,
                    sha256,
                    parameters,
                    rate: None,
                })
            })
            .collect()
    }

    /// As `resolve`; without `download`, a hub model that is not on this machine yet is
    /// `None` (a local path that does not exist is still an error).
    pub fn resolve_if_available(
        &self,
        spec: &ModelSpec,
        download: bool,
    ) -> Result<Option<ResolvedModel>, Diagnostic> {
        if let ModelSource::Server(server) = &spec.gguf.value {
            return match crate::backend::server::probe(server) {
                Ok(identity) => Ok(Some(ResolvedModel {
                    id: spec.id.clone(),
                    path: PathBuf::from(&server.url),
                    sha256: identity.model_digest(),
                    size: 0,
                    n_ctx: identity.n_ctx.unwrap_or(spec.n_ctx),
                    found_via: "server",
                    server: Some(std::sync::Arc::new(crate::backend::server::ServerModel {
                        spec: (**server).clone(),
                        identity,
                    })),
                })),
                // Commands that only look (plan, report) go on without the server's
                // answer; a run needs it.
                Err(_) if !download => Ok(None),
                Err(e) => Err(spec.gguf.error(e.to_string())),
            };
        }
        let (path, found_via, downloaded) = match self.locate(spec)? {
            Some((p, via)) => (p, via, false),
            None if !download && matches!(spec.gguf.value, ModelSource::Hub { .. }) => {
                return Ok(None);
            }
            None => match &spec.gguf.value {
                ModelSource::Path(p) if p.is_dir() => {
                    return Err(spec.gguf.error(format!(
                        "{} is a folder; name the model's .gguf file",
                        p.display()
                    )));
                }
                ModelSource::Path(p) => {
                    let mut msg = format!("model file not found: {}", p.display());
                    if let Some(dir) = &self.models_dir {
                        msg.push_str(&format!(
                            " (nor in the models folder {}, set by --models-dir or PIPELINE_MODELS_DIR)",
                            dir.display()
                        ));
                    }
                    return Err(spec.gguf.error(msg));
                }
                ModelSource::Hub { owner, repo, file } => match self
                    .hub_fetch(owner, repo, file, false)
                {
                    Ok(p) => (p, "download", true),
                    Err(HubLookup::NotCached) => unreachable!("a download never answers NotCached"),
                    Err(HubLookup::Failed(msg)) => return Err(spec.gguf.error(msg)),
                },
                ModelSource::Server(_) => unreachable!("served models return above"),
            },
        };
        let checked = self.check(spec, &path);
        if checked.is_err() && downloaded {
            // A failed download must not stay in the cache looking like the model.
            remove_hub_file(&path);
        }
        let (sha256, size) = checked?;
        Ok(Some(ResolvedModel {
            id: spec.id.clone(),
            path,
            sha256,
            size,
            n_ctx: spec.n_ctx,
            found_via,
            server: None,
        }))
    }

    fn check(&self, spec: &ModelSpec, path: &Path) -> Result<(String, u64), Diagnostic> {
        check_gguf_magic(path).map_err(|m| spec.gguf.error(m.to_string()))?;
        let (sha, size) = self.sha256_memo(path).map_err(|e| {
            spec.gguf
                .error(format!("cannot read {}: {e}", path.display()))
        })?;
        if let Some(expected) = &spec.sha256
            && expected.value != sha
        {
            return Err(expected.error(format!(
                "wrong sha256 for {}: expected {}, the file has {sha}",
                path.display(),
                expected.value
            )));
        }
        Ok((sha, size))
    }

    /// sha256 of a file, remembered in the checked memo of the cache (see
    /// [`crate::digest_memo`]) so that a model is digested once, not on every run.
    pub fn sha256_memo(&self, path: &Path) -> std::io::Result<(String, u64)> {
        self.memo().sha256(path)
    }

    pub fn memo(&self) -> crate::digest_memo::DigestMemo {
        crate::digest_memo::DigestMemo {
            dir: self.digest_dir.clone(),
            read_only: self.memo_read_only,
        }
    }

    fn hub_fetch(
        &self,
        owner: &str,
        repo: &str,
        file: &str,
        cache_only: bool,
    ) -> Result<PathBuf, HubLookup> {
        let fail =
            |e: &dyn std::fmt::Display| HubLookup::Failed(format!("hf:{owner}/{repo}/{file}: {e}"));
        let mut b = hf_hub::HFClient::builder();
        if let Some(e) = &self.hub.endpoint {
            b = b.endpoint(e.clone());
        }
        if let Some(d) = &self.hub.cache_dir {
            b = b.cache_dir(d.clone());
        }
        if let Some(r) = self.hub.retries {
            b = b.retry_max_attempts(r);
        }
        let client = b.build_sync().map_err(|e| fail(&e))?;
        let handle = client.model(owner, repo);
        if cache_only {
            return match handle
                .download_file()
                .filename(file)
                .local_files_only(true)
                .send()
            {
                Ok(p) => Ok(p),
                Err(hf_hub::HFError::LocalEntryNotFound { .. }) => Err(HubLookup::NotCached),
                Err(e) => Err(fail(&e)),
            };
        }
        let req = handle.download_file().filename(file);
        let result = if self.hub.show_progress {
            let bar = indicatif::ProgressBar::new(0).with_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("valid template"),
            );
            bar.set_message(format!("downloading {file}"));
            req.progress(DownloadBar(bar)).send()
        } else {
            req.send()
        };
        result.map_err(|e| fail(&e))
    }
}

enum HubLookup {
    NotCached,
    Failed(String),
}

struct DownloadBar(indicatif::ProgressBar);

impl hf_hub::progress::ProgressHandler for DownloadBar {
    fn on_progress(&self, event: &hf_hub::progress::ProgressEvent) {
        use hf_hub::progress::{DownloadEvent, ProgressEvent};
        match event {
            ProgressEvent::Download(DownloadEvent::Start { total_bytes, .. }) => {
                self.0.set_length(*total_bytes)
            }
            ProgressEvent::Download(DownloadEvent::Progress { files }) => {
                let done: u64 = files.iter().map(|f| f.bytes_completed).sum();
                self.0.set_position(done);
            }
            ProgressEvent::Download(DownloadEvent::AggregateProgress {
                bytes_completed,
                total_bytes,
                ..
            }) => {
                self.0.set_length(*total_bytes);
                self.0.set_position(*bytes_completed);
            }
            ProgressEvent::Download(DownloadEvent::Complete) => self.0.finish_and_clear(),
            _ => {}
        }
    }
}

/// Remove a file from the hub cache: the snapshot link and the blob it points to, and
/// only inside its repository's folder (`models--OWNER--REPO`): whatever a damaged link
/// points to elsewhere is never touched.
fn remove_hub_file(path: &Path) {
    let Some(repo_dir) = path.ancestors().find(|a| {
        a.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("models--"))
    }) else {
        return;
    };
    let Ok(repo_real) = std::fs::canonicalize(repo_dir) else {
        return;
    };
    if let Ok(target) = std::fs::canonicalize(path)
        && target != path
        && target.starts_with(&repo_real)
    {
        let _ = std::fs::remove_file(target);
    }
    let _ = std::fs::remove_file(path);
}

/// Where model files are looked up by name when neither `--models-dir` nor
/// `PIPELINE_MODELS_DIR` says: the platform's cache folder's `pipeline-models`
/// (`$XDG_CACHE_HOME`, else `~/.cache`), where `scripts/` and `shared/models/fetch` put them.
pub fn default_models_dir() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(cache.join("pipeline-models"))
}

/// A model's parameter count: its GGUF header's where the file is here and readable (the
/// spec's count, if it gives one, must agree), else the spec's.
fn parameters(spec: &ModelSpec, file: Option<&ResolvedModel>) -> Result<Option<u64>, Diagnostic> {
    let stated = spec.parameters.as_ref();
    let header = file
        .filter(|f| f.server.is_none())
        .and_then(|f| crate::gguf::parameters(&f.path).ok())
        .map(|p| p.per_token());
    match (header, stated) {
        (Some(h), Some(s)) if h != s.value => Err(s.error(format!(
            "the model file's GGUF header counts {h} non-embedding parameters (every tensor but the token embedding and the output head), not {}",
            s.value
        ))),
        (Some(h), _) => Ok(Some(h)),
        (None, s) => Ok(s.map(|s| s.value)),
    }
}

/// Fail unless the file starts with the GGUF magic.
pub fn check_gguf_magic(path: &Path) -> Result<(), NotGguf> {
    let mut head = [0u8; 4];
    let mut f = File::open(path).map_err(|e| NotGguf::Unreadable {
        path: path.to_path_buf(),
        source: e,
    })?;
    let n = f.read(&mut head).map_err(|e| NotGguf::Unreadable {
        path: path.to_path_buf(),
        source: e,
    })?;
    if n < 4 || &head != GGUF_MAGIC {
        return Err(NotGguf::Magic {
            path: path.to_path_buf(),
            head: String::from_utf8_lossy(&head[..n]).into_owned(),
        });
    }
    Ok(())
}

/// A model file that is not a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum NotGguf {
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a GGUF file (it starts with {head:?}, expected \"GGUF\")", path.display())]
    Magic { path: PathBuf, head: String },
}

/// Write a tiny stand-in GGUF file (magic + payload), for tests and examples.
pub fn write_fake_gguf(path: &Path, payload: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(GGUF_MAGIC)?;
    f.write_all(payload)
}
