//! The HTTP API: request and response types (the OpenAPI document is generated from them),
//! and the errors as JSON.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A text to classify.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ClassifyRequest {
    /// The text (UTF-8, not empty). Cleaned like the study's rows; a text longer than the
    /// spec's `max_text_tokens` is cut to it, as in the study.
    pub text: String,
}

/// Several texts at once (at most the server's `--max-batch`).
#[derive(Debug, Deserialize, ToSchema)]
pub struct ClassifyBatchRequest {
    pub rows: Vec<ClassifyRequest>,
}

/// A labelled row of the pool, near the text asked about.
#[derive(Debug, Serialize, ToSchema)]
pub struct SimilarRow {
    pub id: String,
    pub text: String,
    pub label: String,
    /// Cosine similarity of the two texts' sentence embeddings.
    pub similarity: f32,
}

/// The answer of the served cell.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClassifyResponse {
    /// The predicted label; `null` when a generated answer names no label.
    pub label: Option<String>,
    /// `loglik` cells: the (calibrated, when the cell is calibrated) probability of the
    /// predicted label, normalised over the labels. `knn_vote` cells: the predicted label's
    /// similarity-weighted vote share. `generate` cells: `null`: one generated answer
    /// carries no probability, and none is made up.
    pub confidence: Option<f64>,
    /// Every label's probability, as `confidence` (null for `generate` cells).
    pub label_probs: Option<std::collections::BTreeMap<String, f64>>,
    /// A `generate` cell's raw answer.
    pub raw_answer: Option<String>,
    /// The `k` nearest labelled rows of the spec's pool (`?k=`, default 3; empty when the
    /// spec has no embedder).
    pub similar: Vec<SimilarRow>,
    /// The examples the prompt showed, for cells with retrieved examples.
    pub examples_shown: Vec<SimilarRow>,
    /// The study cell that answered.
    pub cell: String,
    /// A cascade cell: the stage that answered (0: the first), and each stage's cell that
    /// the text went through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cascade_stage: Option<usize>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<String>,
    /// Answered from the row cache (the study, or an earlier request, computed it; for a
    /// cascade, every stage the text went through).
    pub cached: bool,
    pub latency_ms: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClassifyBatchResponse {
    pub results: Vec<ClassifyResponse>,
}

// The seed notebook's API, kept as an alias of the classify endpoints: its field names.

/// `/v1/sentiment`: the text under the seed notebook's field name.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SentimentRequest {
    pub review_text: String,
}

/// `/v1/sentiment/batch`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SentimentBatchRequest {
    pub reviews: Vec<SentimentRequest>,
}

/// [`ClassifyResponse`] under the seed notebook's names: `sentiment` for `label`,
/// `similar_reviews` for `similar`; the other fields as there.
#[derive(Debug, Serialize, ToSchema)]
pub struct SentimentResponse {
    /// `label`.
    pub sentiment: Option<String>,
    /// As in `ClassifyResponse`: the predicted label's probability (`loglik`), vote share
    /// (`knn_vote`), or `null` for `generate` cells.
    pub confidence: Option<f64>,
    pub label_probs: Option<std::collections::BTreeMap<String, f64>>,
    pub raw_answer: Option<String>,
    pub similar_reviews: Vec<SimilarRow>,
    pub examples_shown: Vec<SimilarRow>,
    pub cell: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cascade_stage: Option<usize>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<String>,
    pub cached: bool,
    pub latency_ms: f64,
}

impl From<ClassifyResponse> for SentimentResponse {
    fn from(r: ClassifyResponse) -> Self {
        SentimentResponse {
            sentiment: r.label,
            confidence: r.confidence,
            label_probs: r.label_probs,
            raw_answer: r.raw_answer,
            similar_reviews: r.similar,
            examples_shown: r.examples_shown,
            cell: r.cell,
            cascade_stage: r.cascade_stage,
            stages: r.stages,
            cached: r.cached,
            latency_ms: r.latency_ms,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SentimentBatchResponse {
    pub results: Vec<SentimentResponse>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, `loading` or `failed`.
    pub status: String,
    pub cell: String,
    /// Why it is not ready, while loading or after a failure.
    pub detail: Option<String>,
}

/// An error: what went wrong, and the request field it concerns.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiError {
    pub error: String,
    pub field: Option<String>,
    #[serde(skip)]
    pub status: u16,
    #[serde(skip)]
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>, field: Option<&str>) -> Self {
        Self {
            error: error.into(),
            field: field.map(str::to_string),
            status: status.as_u16(),
            retry_after: None,
        }
    }

    pub fn unprocessable(field: &str, error: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, error, Some(field))
    }

    pub fn busy() -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "the queue is full; retry later",
                None,
            )
        }
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry = self.retry_after;
        let mut r = (status, Json(self)).into_response();
        if let Some(s) = retry {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// Parse a JSON body, naming the field when a value is missing, of the wrong type, not
/// UTF-8 or empty.
pub fn parse_body<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    field: &str,
) -> Result<T, ApiError> {
    if std::str::from_utf8(bytes).is_err() {
        return Err(ApiError::unprocessable(
            field,
            format!("{field} is not valid UTF-8"),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof => ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
                None,
            ),
            _ => ApiError::unprocessable(field, e.to_string()),
        }
    })
}
