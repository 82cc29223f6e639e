//! The `Billing` service: usage queries, price plans, invoices, exports.

use super::status::OrStatus;
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use futures_util::stream::try_unfold;

use super::convert::{micros, opt_timestamp, principal, timestamp};
use super::pb::v1 as pb;
use super::pb::v1::billing_server::Billing;
use super::pb::v1::{
    ExportInvoiceLinesResponse, ExportRequest, ExportUsageEventsResponse, FinalizeInvoiceRequest,
    GetInvoiceRequest, GetUsageRequest, GetUsageResponse, Invoice, InvoiceLine, InvoiceStatus,
    LineKind, ListInvoicesRequest, ListInvoicesResponse, ListPricePlansRequest,
    ListPricePlansResponse, Money, Price, PricePlan, PutPricesRequest,
};
use super::pb::v1::{UsageBucket, UsageGrouping};
use crate::auth::Principal;
use crate::billing::BillingSettings;
use crate::billing::export::{CHUNK_ROWS, EventPager, LinePager, Pager};
use crate::billing::{self, BillingService, MoneyInput, PriceInput, PutPrices};
use crate::calendar::Month;
use crate::limits::{Cost, Limiter};
use crate::metering::{self, Grouping, HOUR_US, UsageTotals};
use crate::store::Db;
use crate::tenancy::{Limits, PageRequest, TenancyService};

/// Handlers of `ascend.gateway.v1.Billing`.
#[derive(Clone)]
pub struct BillingApi {
    db: Db,
    tenancy: TenancyService,
    billing: BillingService,
    limiter: Arc<Limiter>,
    /// The request rate each tenant's keys get on this service, apart from
    /// their inference limits.
    tenant_limits: Limits,
    archiver: billing::archive::Archiver,
}

impl BillingApi {
    pub fn new(
        db: Db,
        tenancy: TenancyService,
        billing: BillingService,
        limiter: Arc<Limiter>,
        settings: &BillingSettings,
        archive_dir: std::path::PathBuf,
    ) -> BillingApi {
        BillingApi {
            archiver: billing::archive::Archiver::new(db.clone(), archive_dir),
            db,
            tenancy,
            billing,
            limiter,
            tenant_limits: Limits {
                requests_per_second: Some(settings.tenant_requests_per_second),
                burst: Some(settings.tenant_burst),
                ..Limits::default()
            },
        }
    }

    /// Who is calling; a tenant key's call counts against its tenant's
    /// `billing.tenant_requests_per_second` (exports and usage queries are
    /// heavy reads), shared across replicas like every limit. The admin
    /// token is not limited.
    async fn caller<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let caller = principal(request)?;
        if let Principal::Tenant(tenant) = &caller {
            let scope = format!("{}/billing", tenant.tenant_id);
            let permit = self
                .limiter
                .admit(&scope, &self.tenant_limits, Cost::default())
                .await
                .or_status()?;
            permit.settle(crate::limits::Used::NOTHING).await;
        }
        Ok(caller)
    }

    /// As [`BillingApi::scoped_tenant`], except that the admin token may
    /// leave `tenant` empty to mean every tenant (`None`).
    async fn tenant_or_all(
        &self,
        principal: &Principal,
        asked: &str,
    ) -> Result<Option<String>, Status> {
        match principal {
            Principal::Admin(_) if asked.is_empty() => Ok(None),
            _ => self.scoped_tenant(principal, asked).await.map(Some),
        }
    }

    /// The tenants (or all) and period an export request is about.
    async fn export_scope(
        &self,
        request: Request<ExportRequest>,
    ) -> Result<(Option<String>, Month), Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let period = BillingService::parse_period("period", &r.period).or_status()?;
        let tenant = self.tenant_or_all(&caller, &r.tenant).await?;
        Ok((tenant, period))
    }

    /// The tenant a billing request is about: a tenant key sees only its own
    /// tenant; the admin token must name one.
    async fn scoped_tenant(&self, principal: &Principal, asked: &str) -> Result<String, Status> {
        match principal {
            Principal::Admin(_) => {
                if asked.is_empty() {
                    return Err(Status::invalid_argument(
                        "invalid `tenant`: required with the admin token (an id or slug)",
                    ));
                }
                let tenant = self.tenancy.get_tenant(asked).await.or_status()?;
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

impl BillingApi {
    fn archive_pb(&self, manifest: billing::archive::Manifest) -> pb::UsageArchive {
        pb::UsageArchive {
            file: self.archiver.file_path(&manifest).display().to_string(),
            period: manifest.period,
            sha256: manifest.sha256,
            events: manifest.events,
            prompt_tokens: manifest.prompt_tokens,
            completion_tokens: manifest.completion_tokens,
            archived_at: Some(timestamp(manifest.archived_at_us)),
        }
    }
}

fn require_admin(caller: &Principal, rpc: &str) -> Result<(), Status> {
    match caller {
        Principal::Admin(_) => Ok(()),
        Principal::Tenant(_) => Err(Status::permission_denied(format!(
            "{rpc} needs the admin token"
        ))),
    }
}

fn money(currency_code: &str, amount_nanos: i64) -> Money {
    Money {
        currency_code: currency_code.to_owned(),
        amount_nanos,
    }
}

fn money_in(m: Money) -> MoneyInput {
    MoneyInput {
        currency_code: m.currency_code,
        nanos: m.amount_nanos,
    }
}

fn plan_pb(plan: billing::PricePlan) -> PricePlan {
    let currency = plan.currency_code;
    PricePlan {
        prices: plan
            .prices
            .into_iter()
            .map(|p| Price {
                prompt_per_million_tokens: Some(money(&currency, p.prompt_per_million_nanos)),
                cached_prompt_per_million_tokens: p
                    .cached_prompt_per_million_nanos
                    .map(|n| money(&currency, n)),
                completion_per_million_tokens: Some(money(
                    &currency,
                    p.completion_per_million_nanos,
                )),
                per_kwh: p.per_kwh_nanos.map(|n| money(&currency, n)),
                effective_from: Some(timestamp(p.effective_from_us)),
                model: p.model,
                device_class: p.device_class,
            })
            .collect(),
        name: plan.name,
        currency_code: currency,
        description: plan.description,
    }
}

fn line_pb(l: &billing::InvoiceLine) -> InvoiceLine {
    InvoiceLine {
        invoice_id: l.invoice_id.clone(),
        line_number: l.line_number,
        model: l.model.clone(),
        device_class: l.device_class.clone(),
        kind: match l.kind {
            billing::LineKind::PromptTokens => LineKind::PromptTokens,
            billing::LineKind::CachedPromptTokens => LineKind::CachedPromptTokens,
            billing::LineKind::CompletionTokens => LineKind::CompletionTokens,
            billing::LineKind::Energy => LineKind::Energy,
        }
        .into(),
        quantity: u64::try_from(l.quantity).unwrap_or(0),
        unit_price: Some(money(&l.currency_code, l.unit_price_nanos)),
        amount: Some(money(&l.currency_code, l.amount_nanos)),
        adjusts_period: l.adjusts_period.clone(),
        price_effective_from: Some(timestamp(l.price_effective_from_us)),
        tenant_id: l.tenant_id.clone(),
        tenant_slug: l.tenant_slug.clone(),
        period: l.period.clone(),
    }
}

fn invoice_pb(i: billing::Invoice) -> Invoice {
    Invoice {
        status: match i.status {
            billing::InvoiceStatus::Draft => InvoiceStatus::Draft,
            billing::InvoiceStatus::Finalized => InvoiceStatus::Finalized,
        }
        .into(),
        total: Some(money(&i.currency_code, i.total_nanos)),
        lines: i.lines.iter().map(line_pb).collect(),
        created_at: Some(timestamp(i.created_at_us)),
        finalized_at: opt_timestamp(i.finalized_at_us),
        grace_ends_at: Some(timestamp(i.grace_ends_at_us)),
        period: i.period.to_string(),
        id: i.id,
        tenant_id: i.tenant_id,
        tenant_slug: i.tenant_slug,
        currency_code: i.currency_code,
    }
}

fn micros_of(ts: Option<&prost_types::Timestamp>) -> i64 {
    ts.map_or(0, |t| {
        t.seconds
            .saturating_mul(1_000_000)
            .saturating_add(i64::from(t.nanos / 1000))
    })
}

/// An exported line back in domain form, for clients that write files
/// (`ascendctl billing export`).
pub fn line_from_pb(l: &InvoiceLine) -> billing::InvoiceLine {
    let amount = l.amount.clone().unwrap_or_default();
    billing::InvoiceLine {
        invoice_id: l.invoice_id.clone(),
        line_number: l.line_number,
        model: l.model.clone(),
        device_class: l.device_class.clone(),
        kind: match l.kind() {
            LineKind::CompletionTokens => billing::LineKind::CompletionTokens,
            LineKind::Energy => billing::LineKind::Energy,
            LineKind::CachedPromptTokens => billing::LineKind::CachedPromptTokens,
            LineKind::PromptTokens | LineKind::Unspecified => billing::LineKind::PromptTokens,
        },
        quantity: i64::try_from(l.quantity).unwrap_or(i64::MAX),
        unit_price_nanos: l.unit_price.as_ref().map_or(0, |m| m.amount_nanos),
        amount_nanos: amount.amount_nanos,
        adjusts_period: l.adjusts_period.clone(),
        price_effective_from_us: micros_of(l.price_effective_from.as_ref()),
        tenant_id: l.tenant_id.clone(),
        tenant_slug: l.tenant_slug.clone(),
        period: l.period.clone(),
        currency_code: amount.currency_code,
    }
}

/// An exported usage event back in domain form.
pub fn event_from_pb(e: &pb::UsageEvent) -> metering::UsageEvent {
    metering::UsageEvent {
        request_id: e.request_id.clone(),
        tenant_id: e.tenant_id.clone(),
        key_id: e.key_id.clone(),
        model: e.model.clone(),
        device_profile: e.device_profile.clone(),
        prompt_tokens: e.prompt_tokens,
        cached_prompt_tokens: e.cached_prompt_tokens,
        completion_tokens: e.completion_tokens,
        queue_time_us: e.queue_time_us,
        ttft_us: e.time_to_first_token_us,
        total_time_us: e.total_time_us,
        device_time_us: e.device_time_us,
        energy_mj: e.energy_mj,
        mean_power_mw: e.mean_power_mw,
        finish_reason: metering::FinishReason::from_stored(&e.finish_reason),
        started_at_us: micros_of(e.started_at.as_ref()),
        finished_at_us: micros_of(e.finished_at.as_ref()),
    }
}

fn event_pb(e: metering::UsageEvent) -> pb::UsageEvent {
    pb::UsageEvent {
        request_id: e.request_id,
        tenant_id: e.tenant_id,
        key_id: e.key_id,
        model: e.model,
        device_profile: e.device_profile,
        prompt_tokens: e.prompt_tokens,
        cached_prompt_tokens: e.cached_prompt_tokens,
        completion_tokens: e.completion_tokens,
        queue_time_us: e.queue_time_us,
        time_to_first_token_us: e.ttft_us,
        total_time_us: e.total_time_us,
        device_time_us: e.device_time_us,
        energy_mj: e.energy_mj,
        mean_power_mw: e.mean_power_mw,
        finish_reason: e.finish_reason.as_str().to_owned(),
        started_at: Some(timestamp(e.started_at_us)),
        finished_at: Some(timestamp(e.finished_at_us)),
    }
}

fn bucket(t: UsageTotals) -> UsageBucket {
    UsageBucket {
        start_time: t.start_us.map(timestamp),
        model: t.model.unwrap_or_default(),
        requests: t.requests,
        prompt_tokens: t.prompt_tokens,
        cached_prompt_tokens: t.cached_prompt_tokens,
        completion_tokens: t.completion_tokens,
        device_time_us: t.device_time_us,
        energy_mj: t.energy_mj,
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A pager's chunks as a response stream; the first message carries the row
/// count and is sent even when there are no rows.
fn chunk_stream<P: Pager, M: Send + 'static>(
    pager: P,
    message: fn(Option<u64>, Vec<P::Row>) -> M,
) -> ResponseStream<M> {
    let total = pager.total_rows();
    Box::pin(try_unfold(
        (pager, true),
        move |(mut pager, first)| async move {
            let rows = pager.next_chunk().await.or_status()?;
            if rows.is_none() && !first {
                return Ok(None);
            }
            let chunk = message(first.then_some(total), rows.unwrap_or_default());
            Ok(Some((chunk, (pager, false))))
        },
    ))
}

#[tonic::async_trait]
impl Billing for BillingApi {
    async fn get_usage(
        &self,
        request: Request<GetUsageRequest>,
    ) -> Result<Response<GetUsageResponse>, Status> {
        let caller = self.caller(&request).await?;
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
                .or_status()?;
        Ok(Response::new(GetUsageResponse {
            tenant_id,
            buckets: groups.into_iter().map(bucket).collect(),
            total: Some(bucket(total)),
        }))
    }

    async fn list_price_plans(
        &self,
        request: Request<ListPricePlansRequest>,
    ) -> Result<Response<ListPricePlansResponse>, Status> {
        let caller = self.caller(&request).await?;
        let mut plans = self.billing.list_plans().await.or_status()?;
        // A tenant sees the plan it is billed under, not other tenants'
        // prices.
        if let Principal::Tenant(tenant) = &caller {
            plans.retain(|plan| plan.name == tenant.price_plan);
        }
        Ok(Response::new(ListPricePlansResponse {
            plans: plans.into_iter().map(plan_pb).collect(),
        }))
    }

    async fn put_prices(
        &self,
        request: Request<PutPricesRequest>,
    ) -> Result<Response<PricePlan>, Status> {
        let caller = self.caller(&request).await?;
        require_admin(&caller, "Billing.PutPrices")?;
        let r = request.into_inner();
        let mut prices = Vec::with_capacity(r.prices.len());
        for (i, p) in r.prices.into_iter().enumerate() {
            let effective_from_us = p
                .effective_from
                .as_ref()
                .map(|ts| micros(&format!("prices[{i}].effective_from"), ts))
                .transpose()?;
            prices.push(PriceInput {
                model: p.model,
                device_class: p.device_class,
                prompt_per_million_tokens: p.prompt_per_million_tokens.map(money_in),
                cached_prompt_per_million_tokens: p.cached_prompt_per_million_tokens.map(money_in),
                completion_per_million_tokens: p.completion_per_million_tokens.map(money_in),
                per_kwh: p.per_kwh.map(money_in),
                effective_from_us,
            });
        }
        let plan = self
            .billing
            .put_prices(
                &caller.actor(),
                PutPrices {
                    plan: r.plan,
                    currency_code: r.currency_code,
                    description: r.description,
                    prices,
                },
            )
            .await
            .or_status()?;
        Ok(Response::new(plan_pb(plan)))
    }

    async fn list_invoices(
        &self,
        request: Request<ListInvoicesRequest>,
    ) -> Result<Response<ListInvoicesResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let tenant = self.tenant_or_all(&caller, &r.tenant).await?;
        let period = if r.period.is_empty() {
            None
        } else {
            Some(BillingService::parse_period("period", &r.period).or_status()?)
        };
        let status = match InvoiceStatus::try_from(r.status) {
            Ok(InvoiceStatus::Unspecified) => None,
            Ok(InvoiceStatus::Draft) => Some(billing::InvoiceStatus::Draft),
            Ok(InvoiceStatus::Finalized) => Some(billing::InvoiceStatus::Finalized),
            Err(_) => return Err(Status::invalid_argument("invalid `status`: unknown value")),
        };
        let page = PageRequest::parse("invoices", r.page_size, &r.page_token).or_status()?;
        let page = self
            .billing
            .list_invoices(tenant.as_deref(), period, status, &page)
            .await
            .or_status()?;
        Ok(Response::new(ListInvoicesResponse {
            invoices: page.items.into_iter().map(invoice_pb).collect(),
            next_page_token: page.next_token.unwrap_or_default(),
        }))
    }

    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::Balance>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let tenant_id = self.scoped_tenant(&caller, &r.tenant).await?;
        let tenant = self.tenancy.get_tenant(&tenant_id).await.or_status()?;
        let budget = tenant.limits.monthly_budget.map(|b| b.amount_nanos);
        let b = billing::balance::Balances::new(self.billing.clone(), self.limiter.clone())
            .of(&tenant_id, budget)
            .await
            .or_status()?;
        let currency = b.currency_code;
        Ok(Response::new(pb::Balance {
            tenant_id: b.tenant_id,
            period: b.period.to_string(),
            spent: Some(money(&currency, b.spent_nanos)),
            monthly_budget: b.budget_nanos.map(|n| money(&currency, n)),
            remaining: b.remaining_nanos.map(|n| money(&currency, n)),
            budget_spent: b
                .budget_nanos
                .map(|_| money(&currency, b.budget_spent_nanos)),
            reserved: Some(money(&currency, b.reserved_nanos)),
            is_available: b.is_available,
        }))
    }

    async fn get_invoice(
        &self,
        request: Request<GetInvoiceRequest>,
    ) -> Result<Response<Invoice>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let invoice = if !r.invoice_id.is_empty() {
            let own = match &caller {
                Principal::Admin(_) => None,
                Principal::Tenant(t) => Some(t.tenant_id.as_str()),
            };
            self.billing.get_invoice(&r.invoice_id, own).await
        } else {
            if r.period.is_empty() {
                return Err(Status::invalid_argument(
                    "invalid `period`: required without `invoice_id` (YYYY-MM)",
                ));
            }
            let period = BillingService::parse_period("period", &r.period).or_status()?;
            let tenant_id = self.scoped_tenant(&caller, &r.tenant).await?;
            self.billing.get_invoice_of(&tenant_id, period).await
        };
        Ok(Response::new(invoice_pb(invoice.or_status()?)))
    }

    async fn finalize_invoice(
        &self,
        request: Request<FinalizeInvoiceRequest>,
    ) -> Result<Response<Invoice>, Status> {
        let caller = self.caller(&request).await?;
        require_admin(&caller, "Billing.FinalizeInvoice")?;
        let r = request.into_inner();
        if r.invoice_id.is_empty() {
            return Err(Status::invalid_argument("invalid `invoice_id`: required"));
        }
        let invoice = self
            .billing
            .finalize(&caller.actor(), &r.invoice_id)
            .await
            .or_status()?;
        Ok(Response::new(invoice_pb(invoice)))
    }

    async fn archive_usage(
        &self,
        request: Request<pb::ArchiveUsageRequest>,
    ) -> Result<Response<pb::UsageArchive>, Status> {
        let caller = self.caller(&request).await?;
        require_admin(&caller, "Billing.ArchiveUsage")?;
        let period =
            BillingService::parse_period("period", &request.get_ref().period).or_status()?;
        let manifest = self.archiver.archive(period).await.or_status()?;
        Ok(Response::new(self.archive_pb(manifest)))
    }

    async fn restore_usage(
        &self,
        request: Request<pb::RestoreUsageRequest>,
    ) -> Result<Response<pb::UsageArchive>, Status> {
        let caller = self.caller(&request).await?;
        require_admin(&caller, "Billing.RestoreUsage")?;
        let period =
            BillingService::parse_period("period", &request.get_ref().period).or_status()?;
        let manifest = self.archiver.restore(period).await.or_status()?;
        Ok(Response::new(self.archive_pb(manifest)))
    }

    type ExportInvoiceLinesStream = ResponseStream<ExportInvoiceLinesResponse>;

    async fn export_invoice_lines(
        &self,
        request: Request<ExportRequest>,
    ) -> Result<Response<Self::ExportInvoiceLinesStream>, Status> {
        let (tenant, period) = self.export_scope(request).await?;
        let pager = LinePager::open(&self.billing, tenant.as_deref(), period, CHUNK_ROWS)
            .await
            .or_status()?;
        Ok(Response::new(chunk_stream(pager, |total_rows, lines| {
            ExportInvoiceLinesResponse {
                total_rows,
                lines: lines.iter().map(line_pb).collect(),
            }
        })))
    }

    type ExportUsageEventsStream = ResponseStream<ExportUsageEventsResponse>;

    async fn export_usage_events(
        &self,
        request: Request<ExportRequest>,
    ) -> Result<Response<Self::ExportUsageEventsStream>, Status> {
        let (tenant, period) = self.export_scope(request).await?;
        let pager = EventPager::open(&self.db, tenant.as_deref(), period, CHUNK_ROWS)
            .await
            .or_status()?;
        Ok(Response::new(chunk_stream(pager, |total_rows, events| {
            ExportUsageEventsResponse {
                total_rows,
                events: events.into_iter().map(event_pb).collect(),
            }
        })))
    }
}
