//! What a computed row is, whoever computed it and wherever it is stored: how its answer
//! ended, or why it could not be computed.

named_enum! {
    /// How a row's computation ended.
    pub enum Finish {
        /// The model ended its turn.
        Eog,
        /// A stop string was generated (and cut off).
        Stop,
        /// `max_tokens` was reached.
        Length,
        /// Log-likelihood scoring (no generation).
        Scored,
        /// The row could not be computed; its error says why. Never a cache hit.
        Failed,
    }
}

named_enum! {
    /// What a row computed: a generation, or the log-probabilities of the labels.
    pub enum TaskKind {
        Generate,
        Loglik,
        /// The model's hidden states, pooled, for a probe.
        Hidden,
    }
}

named_enum! {
    /// Why a row (or a model) could not be computed, as rows, stats and reports name it.
    pub enum FailureKind {
        /// The prompt and its task do not fit the model's context.
        ContextOverflow,
        /// The chat template could not be applied.
        ChatTemplate,
        /// The engine failed to evaluate the prompt or decode.
        Decode,
        /// The worker lost the job (a panic or a dropped channel).
        Job,
        /// The model would not load.
        Load,
        /// An embedder that is not an embedding model.
        NotEmbedding,
        /// A model server failed the request (after its retries).
        Server,
    }
}

/// Why one row could not be computed: its kind and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RowError {
    pub kind: FailureKind,
    pub message: String,
}

/// This machine's host name, as rows record where they were computed.
pub fn this_host() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}
