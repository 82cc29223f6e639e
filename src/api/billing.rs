//! The `Billing` service: usage queries, price plans, invoices, exports.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert::{micros, principal, timestamp};
use super::pb::v1::billing_server::Billing;
use super::pb::v1::{
    ExportInvoiceLinesResponse, ExportRequest, ExportUsageEventsResponse, FinalizeInvoiceRequest,
    GetInvoiceRequest, GetUsageRequest, GetUsageResponse, Invoice, ListInvoicesRequest,
    ListInvoicesResponse, ListPricePlansRequest, ListPricePlansResponse, PricePlan,
    PutPricesRequest,
};
use super::pb::v1::{UsageBucket, UsageGrouping};
use super::status::{not_implemented, to_status};
use crate::auth::Principal;
use crate::metering::{self, Grouping, HOUR_US, UsageTotals};
use crate::store::Db;
use crate::tenancy::TenancyService;

/// Handlers of `ascend.gateway.v1.Billing`.
#[derive(Clone)]
pub struct BillingApi {
    db: Db,
    tenancy: TenancyService,
}

impl BillingApi {
    pub fn new(db: Db, tenancy: TenancyService) -> BillingApi {
        BillingApi { db, tenancy }
    }

    /// The tenant a billing request is about: a tenant key sees only its own
    /// tenant; the admin token must name one.
    async fn scoped_tenant(&self, principal: &Principal, asked: &str) -> Result<String, Status> {
        match principal {
            Principal::Admin => {
                if asked.is_empty() {
                    return Err(Status::invalid_argument(
                        "invalid `tenant`: required with the admin token (an id or slug)",
                    ));
                }
                let tenant = self
                    .tenancy
                    .get_tenant(asked)
                    .await
                    .map_err(|e| to_status(&e))?;
                Ok(tenant.id)
            }
            Principal::Tenant(own) => {
                if asked.is_empty() || asked == own.tenant_id || asked == own.tenant_slug {
                    Ok(own.tenant_id.clone())
                } else {
                    Err(Status::permission_denied(
                        "a tenant key may read only its own tenant's billing data",
                    ))
                }
            }
        }
    }
}

fn bucket(t: UsageTotals) -> UsageBucket {
    UsageBucket {
        start_time: t.start_us.map(timestamp),
        model: t.model.unwrap_or_default(),
        requests: t.requests,
        prompt_tokens: t.prompt_tokens,
        completion_tokens: t.completion_tokens,
        device_time_us: t.device_time_us,
        energy_mj: t.energy_mj,
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Billing for BillingApi {
    async fn get_usage(
        &self,
        request: Request<GetUsageRequest>,
    ) -> Result<Response<GetUsageResponse>, Status> {
        let caller = principal(&request)?;
        let r = request.into_inner();
        let tenant_id = self.scoped_tenant(&caller, &r.tenant).await?;
        let bound = |field: &str, ts: Option<&prost_types::Timestamp>| -> Result<i64, Status> {
            let ts =
                ts.ok_or_else(|| Status::invalid_argument(format!("invalid `{field}`: required")))?;
            let us = micros(field, ts)?;
            if us.rem_euclid(HOUR_US) != 0 {
                return Err(Status::invalid_argument(format!(
                    "invalid `{field}`: must be on an hour boundary (usage is kept per hour)"
                )));
            }
            Ok(us)
        };
        let start = bound("start_time", r.start_time.as_ref())?;
        let end = bound("end_time", r.end_time.as_ref())?;
        if end <= start {
            return Err(Status::invalid_argument(
                "invalid `end_time`: must be after start_time",
            ));
        }
        let grouping = match UsageGrouping::try_from(r.group_by) {
            Ok(UsageGrouping::Unspecified) => Grouping::Total,
            Ok(UsageGrouping::Model) => Grouping::Model,
            Ok(UsageGrouping::Day) => Grouping::Day,
            Ok(UsageGrouping::Hour) => Grouping::Hour,
            Ok(UsageGrouping::ModelDay) => Grouping::ModelDay,
            Ok(UsageGrouping::ModelHour) => Grouping::ModelHour,
            Err(_) => {
                return Err(Status::invalid_argument(
                    "invalid `group_by`: unknown value",
                ));
            }
        };
        let model = (!r.model.is_empty()).then_some(r.model.as_str());
        let (groups, total) =
            metering::query::usage(&self.db, &tenant_id, start, end, model, grouping)
                .await
                .map_err(|e| to_status(&e))?;
        Ok(Response::new(GetUsageResponse {
            tenant_id,
            buckets: groups.into_iter().map(bucket).collect(),
            total: Some(bucket(total)),
        }))
    }

    async fn list_price_plans(
        &self,
        _request: Request<ListPricePlansRequest>,
    ) -> Result<Response<ListPricePlansResponse>, Status> {
        Err(not_implemented("Billing.ListPricePlans"))
    }

    async fn put_prices(
        &self,
        _request: Request<PutPricesRequest>,
    ) -> Result<Response<PricePlan>, Status> {
        Err(not_implemented("Billing.PutPrices"))
    }

    async fn list_invoices(
        &self,
        _request: Request<ListInvoicesRequest>,
    ) -> Result<Response<ListInvoicesResponse>, Status> {
        Err(not_implemented("Billing.ListInvoices"))
    }

    async fn get_invoice(
        &self,
        _request: Request<GetInvoiceRequest>,
    ) -> Result<Response<Invoice>, Status> {
        Err(not_implemented("Billing.GetInvoice"))
    }

    async fn finalize_invoice(
        &self,
        _request: Request<FinalizeInvoiceRequest>,
    ) -> Result<Response<Invoice>, Status> {
        Err(not_implemented("Billing.FinalizeInvoice"))
    }

    type ExportInvoiceLinesStream = ResponseStream<ExportInvoiceLinesResponse>;

    async fn export_invoice_lines(
        &self,
        _request: Request<ExportRequest>,
    ) -> Result<Response<Self::ExportInvoiceLinesStream>, Status> {
        Err(not_implemented("Billing.ExportInvoiceLines"))
    }

    type ExportUsageEventsStream = ResponseStream<ExportUsageEventsResponse>;

    async fn export_usage_events(
        &self,
        _request: Request<ExportRequest>,
    ) -> Result<Response<Self::ExportUsageEventsStream>, Status> {
        Err(not_implemented("Billing.ExportUsageEvents"))
    }
}
