//! What a computed row is, whoever computed it and wherever it is stored: how its answer
//! ended, or why it could not be computed.

/// How a row's computation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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

impl Finish {
    pub fn as_str(&self) -> &'static str {
        match self {
            Finish::Eog => "eog",
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Scored => "scored",
            Finish::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "eog" => Finish::Eog,
            "stop" => Finish::Stop,
            "length" => Finish::Length,
            "scored" => Finish::Scored,
            "failed" => Finish::Failed,
            _ => return None,
        })
    }
}

/// Why one row could not be computed: a short machine-readable kind
/// (`context_overflow`, `chat_template`, `decode`, `job`) and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RowError {
    pub kind: String,
    pub message: String,
}

/// The kind of a row whose prompt and task do not fit the model's context.
pub const CONTEXT_OVERFLOW: &str = "context_overflow";

/// This machine's host name, as rows record where they were computed.
pub fn this_host() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}
