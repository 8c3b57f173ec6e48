//! The HTTP API: request and response types (the OpenAPI document is generated from them),
//! and the errors as JSON.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A review to classify. The field name is the seed notebook's.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SentimentRequest {
    /// The review, as text (UTF-8, not empty). Cleaned like the study's rows; a review longer
    /// than the spec's `max_text_tokens` is cut to it, as in the study.
    pub review_text: String,
}

/// Several reviews at once (at most the server's `--max-batch`).
#[derive(Debug, Deserialize, ToSchema)]
pub struct BatchRequest {
    pub reviews: Vec<SentimentRequest>,
}

/// A labelled review of the pool, near the one asked about.
#[derive(Debug, Serialize, ToSchema)]
pub struct SimilarReview {
    pub id: String,
    pub text: String,
    pub label: String,
    /// Cosine similarity of the two reviews' sentence embeddings.
    pub similarity: f32,
}

/// The answer, with the seed notebook's field names (`sentiment`, `confidence`) and more.
#[derive(Debug, Serialize, ToSchema)]
pub struct SentimentResponse {
    /// The predicted label; `null` when a generated answer names no label.
    pub sentiment: Option<String>,
    /// `loglik` cells: the (calibrated, when the cell is calibrated) probability of the
    /// predicted label, normalised over the labels. `knn_vote` cells: the predicted label's
    /// similarity-weighted vote share. `generate` cells: `null`: one generated answer
    /// carries no probability, and none is made up.
    pub confidence: Option<f64>,
    /// Every label's probability, as `confidence` (null for `generate` cells).
    pub label_probs: Option<std::collections::BTreeMap<String, f64>>,
    /// A `generate` cell's raw answer.
    pub raw_answer: Option<String>,
    /// The `k` nearest labelled reviews of the spec's pool (`?k=`, default 3; empty when
    /// the spec has no embedder).
    pub similar_reviews: Vec<SimilarReview>,
    /// The examples the prompt showed, for cells with retrieved examples.
    pub examples_shown: Vec<SimilarReview>,
    /// The study cell that answered.
    pub cell: String,
    /// A cascade cell: the stage that answered (0: the first), and each stage's cell that
    /// the review went through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cascade_stage: Option<usize>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<String>,
    /// Answered from the row cache (the study, or an earlier request, computed it; for a
    /// cascade, every stage the review went through).
    pub cached: bool,
    pub latency_ms: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchResponse {
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
