//! `GET /v1/models` and `GET /v1/models/{id}` in OpenAI's shape, with the
//! gateway's own facts about each model beside the standard fields.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::HttpApi;
use super::error::ApiError;
use super::headers;
use crate::limits::Headroom;
use crate::serving::ServedModel;

#[derive(Debug, Serialize)]
struct ModelBody<'a> {
    id: &'a str,
    object: &'static str,
    created: i64,
    owned_by: &'static str,
    description: &'a str,
    context_length: usize,
    max_output_tokens: u32,
    device_profile: &'a str,
}

#[derive(Debug, Serialize)]
struct ListBody<'a> {
    object: &'static str,
    data: Vec<ModelBody<'a>>,
}

fn model_body(served: &ServedModel) -> ModelBody<'_> {
    ModelBody {
        id: &served.settings.id,
        object: "model",
        created: 0,
        owned_by: "ascend-gateway",
        description: &served.settings.description,
        context_length: served.context_length,
        max_output_tokens: served.settings.max_output_tokens,
        device_profile: &served.device_profile,
    }
}

pub(super) fn json<T: Serialize>(body: &T) -> Response {
    // Strings and numbers only: serializing cannot fail.
    let text = serde_json::to_string(body).unwrap_or_default();
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        text,
    )
        .into_response()
}

/// The tenant's key checked and the call counted against its request rate.
async fn admitted(api: &HttpApi, request: Request) -> Result<Headroom, Response> {
    let (parts, _) = request.into_parts();
    let tenant = api
        .tenant(&parts)
        .await
        .map_err(IntoResponse::into_response)?;
    api.generation()
        .admit_call(&tenant)
        .await
        .map_err(|error| api.error(&error, &tenant).into_response())
}

pub async fn list(State(api): State<HttpApi>, request: Request) -> Response {
    let headroom = match admitted(&api, request).await {
        Ok(headroom) => headroom,
        Err(refused) => return refused,
    };
    let models: Vec<&Arc<ServedModel>> = api.generation().models().collect();
    let mut response = json(&ListBody {
        object: "list",
        data: models.iter().map(|m| model_body(m)).collect(),
    });
    headers::admitted(response.headers_mut(), headroom);
    response
}

pub async fn one(State(api): State<HttpApi>, Path(id): Path<String>, request: Request) -> Response {
    let headroom = match admitted(&api, request).await {
        Ok(headroom) => headroom,
        Err(refused) => return refused,
    };
    match api.generation().models().find(|m| m.settings.id == id) {
        Some(served) => {
            let mut response = json(&model_body(served));
            headers::admitted(response.headers_mut(), headroom);
            response
        }
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("the model `{id}` does not exist; GET /v1/models lists the served ones"),
        )
        .param("model")
        .code("model_not_found")
        .into_response(),
    }
}
