//! `GET /user/balance` in the shape of DeepSeek's balance endpoint, for the
//! tenant behind the key: what its monthly budget still admits this month.
//! Without a budget `balance_infos` is empty and the tenant is available.

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::HttpApi;
use super::headers;
use crate::billing::money::{Currency, format_decimal};

#[derive(Debug, Serialize)]
struct BalanceInfo {
    currency: String,
    /// What is left of the month's budget.
    total_balance: String,
    /// Credit granted by the vendor: none, budgets are a cap.
    granted_balance: String,
    topped_up_balance: String,
}

#[derive(Debug, Serialize)]
struct BalanceBody {
    is_available: bool,
    balance_infos: Vec<BalanceInfo>,
}

pub async fn balance(State(api): State<HttpApi>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    let tenant = match api.tenant(&parts).await {
        Ok(tenant) => tenant,
        Err(refused) => return refused.into_response(),
    };
    let headroom = match api.generation().admit_call(&tenant).await {
        Ok(headroom) => headroom,
        Err(error) => return api.error(&error, &tenant).into_response(),
    };
    let budget = tenant
        .limits
        .monthly_budget
        .as_ref()
        .map(|b| b.amount_nanos);
    let b = match api.balances().of(&tenant.tenant_id, budget).await {
        Ok(b) => b,
        Err(error) => return api.error(&error, &tenant).into_response(),
    };
    let decimals = Currency::find(&b.currency_code).map_or(2, |c| c.minor_units);
    let text = |nanos: i64| format_decimal(nanos, decimals);
    let body = BalanceBody {
        is_available: b.is_available,
        balance_infos: b
            .remaining_nanos
            .map(|left| BalanceInfo {
                currency: b.currency_code.clone(),
                total_balance: text(left),
                granted_balance: text(0),
                topped_up_balance: text(left),
            })
            .into_iter()
            .collect(),
    };
    let mut response = super::models::json(&body);
    headers::admitted(response.headers_mut(), headroom);
    response
}
