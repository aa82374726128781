//! One error type for the edge, mapped in one place to gRPC codes and HTTP
//! statuses. Messages are lower case and say what was wrong; internal
//! details (paths, OS errors) are logged, never sent to a remote caller.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// What went wrong serving a remote request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request field is invalid: the field and why.
    #[error("invalid {field}: {why}")]
    Invalid {
        /// The field, as the caller named it (`filters.min_price`).
        field: String,
        /// Why.
        why: String,
    },
    /// The thing asked for does not exist.
    #[error("{what} not found: {name}")]
    NotFound {
        /// Kind of thing (`topic`, `symbol`, `subscription`).
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// It exists already.
    #[error("{what} already exists: {name}")]
    AlreadyExists {
        /// Kind of thing.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// This build cannot do it (yet): the message says what and why.
    #[error("{0}")]
    Unimplemented(String),
    /// The request conflicts with the state of something else (a topic a
    /// rule routes to cannot be deleted): the message says what.
    #[error("{0}")]
    Conflict(String),
    /// A limit was reached.
    #[error("limit reached: {0}")]
    Limit(String),
    /// No or an unknown API key.
    #[error("missing or unknown API key")]
    Unauthenticated,
    /// The key may not do this.
    #[error("this API key may not {action} topic {topic}")]
    PermissionDenied {
        /// `read` or `admin`.
        action: &'static str,
        /// Topic.
        topic: String,
    },
    /// The broker is shutting down or a dependency is down.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or an environment failure: logged in full, reported as
    /// "internal error".
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// A field error.
    pub fn invalid(field: impl Into<String>, why: impl Into<String>) -> ApiError {
        ApiError::Invalid {
            field: field.into(),
            why: why.into(),
        }
    }

    /// An internal error: logged here with its detail.
    pub fn internal(detail: impl std::fmt::Display) -> ApiError {
        let detail = detail.to_string();
        tracing::error!(%detail, "internal error serving a request");
        ApiError::Internal(detail)
    }

    /// The HTTP status.
    pub fn http_status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::AlreadyExists { .. } => StatusCode::CONFLICT,
            ApiError::Unimplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Limit(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ApiError::PermissionDenied { .. } => StatusCode::FORBIDDEN,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The gRPC status code.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            ApiError::Invalid { .. } => tonic::Code::InvalidArgument,
            ApiError::NotFound { .. } => tonic::Code::NotFound,
            ApiError::AlreadyExists { .. } => tonic::Code::AlreadyExists,
            ApiError::Unimplemented(_) => tonic::Code::Unimplemented,
            ApiError::Conflict(_) => tonic::Code::FailedPrecondition,
            ApiError::Limit(_) => tonic::Code::ResourceExhausted,
            ApiError::Unauthenticated => tonic::Code::Unauthenticated,
            ApiError::PermissionDenied { .. } => tonic::Code::PermissionDenied,
            ApiError::Unavailable(_) => tonic::Code::Unavailable,
            ApiError::Internal(_) => tonic::Code::Internal,
        }
    }

    /// The `field` of an [`ApiError::Invalid`], for JSON error bodies.
    pub fn field(&self) -> Option<&str> {
        match self {
            ApiError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }

    /// The JSON body REST and WebSocket errors carry:
    /// `{"error": {"code": .., "message": .., "field": ..}}`.
    pub fn body(&self) -> serde_json::Value {
        let mut e = serde_json::json!({
            "code": format!("{:?}", self.grpc_code()),
            "message": self.to_string(),
        });
        if let Some(f) = self.field() {
            e["field"] = f.into();
        }
        serde_json::json!({ "error": e })
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> tonic::Status {
        tonic::Status::new(e.grpc_code(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.http_status(), axum::Json(self.body())).into_response()
    }
}
