//! The model worker: one thread owns the llama.cpp contexts (they are not `Send`) and takes
//! jobs from a bounded channel, each with a oneshot reply: the text-embeddings-inference
//! pattern. Jobs run one after another: on a CPU a prompt already uses every core, and a
//! row's numbers must not depend on what it was scored beside.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::backend::{BackendError, EmbedderLoad, ModelLoad, PromptOutput, Task};
use crate::exec::{Evaluation, evaluate};
use crate::prompt::{Example, Messages, Prompts};

/// A text to evaluate, as prepared by the scorer.
pub struct InferItem {
    pub text: String,
    pub messages: Messages,
    pub examples: Option<Vec<Example>>,
}

pub enum Job {
    Embed {
        texts: Vec<String>,
        reply: oneshot::Sender<Result<Vec<Vec<f32>>, BackendError>>,
    },
    /// Evaluate `prompt` for the item and run `task` on it (a cascade's stages on one
    /// model share its worker).
    Infer {
        item: InferItem,
        prompt: usize,
        task: Task,
        reply: oneshot::Sender<Result<PromptOutput, BackendError>>,
    },
}

/// What the worker serves.
pub struct WorkerSpec {
    pub model: Option<ModelLoad>,
    pub embedder: Option<EmbedderLoad>,
    pub prompts: Arc<Prompts>,
}

/// Start the worker; `ready` is told once the models are loaded (or why they are not).
pub fn spawn(
    name: String,
    spec: WorkerSpec,
    make_backend: super::MakeBackend,
    mut rx: mpsc::Receiver<Job>,
    ready: oneshot::Sender<Result<(), BackendError>>,
) -> std::thread::JoinHandle<()> {
    crate::worker::thread(&name, move || {
        let mut ready = Some(ready);
        let mut models = make_backend();
        let mut embedders = make_backend();
        let mut serve = |llm: Option<&mut dyn crate::backend::Session>,
                         emb: Option<&mut dyn crate::backend::EmbedSession>|
         -> Result<(), BackendError> {
            if let Some(r) = ready.take() {
                let _ = r.send(Ok(()));
            }
            let (mut llm, mut emb) = (llm, emb);
            while let Some(job) = rx.blocking_recv() {
                match job {
                    Job::Embed { texts, reply } => {
                        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                        let out = match emb.as_deref_mut() {
                            Some(e) => e.embed(&refs),
                            None => Err(BackendError::Job("no embedder".into())),
                        };
                        let _ = reply.send(out);
                    }
                    Job::Infer {
                        item,
                        prompt,
                        task,
                        reply,
                    } => {
                        let out = match llm.as_deref_mut() {
                            Some(s) => evaluate(
                                s,
                                &spec.prompts,
                                &Evaluation {
                                    prompt,
                                    text: &item.text,
                                    choices: &[],
                                    messages: &item.messages,
                                    examples: item.examples.as_deref(),
                                },
                                std::slice::from_ref(&task),
                            ),
                            None => Err(BackendError::Job("this cell has no model".into())),
                        };
                        let _ = reply.send(out);
                    }
                }
            }
            Ok(())
        };
        let result = match (&spec.model, &spec.embedder) {
            (Some(m), Some(e)) => embedders.with_embedder(e, &mut |emb| {
                crate::backend::with_model(models.as_mut(), m, &mut |llm| {
                    serve(Some(llm), Some(&mut *emb))
                })
            }),
            (Some(m), None) => {
                crate::backend::with_model(models.as_mut(), m, &mut |llm| serve(Some(llm), None))
            }
            (None, Some(e)) => embedders.with_embedder(e, &mut |emb| serve(None, Some(emb))),
            (None, None) => serve(None, None),
        };
        if let (Err(e), Some(r)) = (result, ready.take()) {
            let _ = r.send(Err(e));
        }
    })
}
