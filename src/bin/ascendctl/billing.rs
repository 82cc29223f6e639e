//! Billing commands: usage, prices, invoices and exports to files.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use ascend_gateway::api::pb::v1::billing_client::BillingClient;
use ascend_gateway::api::pb::v1::{
    self as pb, ExportRequest, FinalizeInvoiceRequest, GetInvoiceRequest, GetUsageRequest,
    InvoiceStatus, ListInvoicesRequest, ListPricePlansRequest, Money, Price, PutPricesRequest,
    UsageGrouping,
};
use ascend_gateway::api::{event_from_pb, line_from_pb};
use ascend_gateway::billing::file::{EventRecord, ExportFile, FileFormat, LineRecord, Record};
use ascend_gateway::billing::money;
use clap::{Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tonic::transport::Channel;

use crate::commands::{Ctx, all_pages};
use crate::output;

#[derive(Subcommand)]
pub enum BillingCommand {
    /// Export a month's invoice lines or usage events to a file.
    Export {
        /// Month, YYYY-MM (UTC)
        #[arg(long)]
        period: String,
        /// One tenant (id or slug) [default: all tenants]
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, value_enum, default_value_t = ExportKind::Lines)]
        kind: ExportKind,
        #[arg(long, value_enum)]
        format: FormatArg,
        /// Written as OUT.partial, renamed to OUT when complete
        #[arg(long)]
        out: PathBuf,
    },
    /// This month's spend against the monthly budget.
    Balance {
        /// Tenant id or slug (required with the admin token)
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Archive a finalized month's raw usage events to Parquet (with a
    /// manifest) under the gateway's billing.archive_dir, and remove them
    /// from the database; rollups and invoices stay.
    Archive {
        /// Month, YYYY-MM (UTC)
        #[arg(long)]
        period: String,
    },
    /// Put an archived month's raw usage events back from its file.
    Restore {
        /// Month, YYYY-MM (UTC)
        #[arg(long)]
        period: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ExportKind {
    /// Invoice lines (finalized as stored, drafts as computed now)
    Lines,
    /// Raw usage events
    Events,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// RFC 4180 CSV with a header row
    Csv,
    /// One JSON object per line
    Jsonl,
    /// Apache Parquet (Snappy)
    Parquet,
}

#[derive(Subcommand)]
pub enum InvoiceCommand {
    /// List invoices (all pages).
    List {
        /// One tenant (id or slug) [default: all tenants]
        #[arg(long)]
        tenant: Option<String>,
        /// Month, YYYY-MM
        #[arg(long)]
        period: Option<String>,
        #[arg(long, value_enum)]
        status: Option<InvoiceStatusArg>,
    },
    /// Show one invoice with its lines: by id, or by --tenant and --period.
    Show {
        invoice_id: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        period: Option<String>,
    },
    /// Finalize a draft invoice; it is immutable afterwards.
    Finalize { invoice_id: String },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum InvoiceStatusArg {
    Draft,
    Finalized,
}

// Parsed once per run: the size of a command-line value does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum PriceCommand {
    /// List price plans and their prices.
    List,
    /// Add a price to a plan (creating the plan when --currency is given).
    Put {
        plan: String,
        #[arg(long)]
        model: String,
        /// Device profile, e.g. ascend-910b [default: any device]
        #[arg(long, default_value = "")]
        device_class: String,
        /// Price per million prompt tokens, a decimal such as 0.08
        #[arg(long)]
        prompt: String,
        /// Price per million prompt tokens served from the prefix cache (cache hits)
        /// [default: the prompt price]
        #[arg(long)]
        cached_prompt: Option<String>,
        /// Price per million completion tokens
        #[arg(long)]
        completion: String,
        /// Optional price per kWh of emulated energy
        #[arg(long)]
        per_kwh: Option<String>,
        /// ISO 4217 code; required for a new plan
        #[arg(long, default_value = "")]
        currency: String,
        #[arg(long, default_value = "")]
        description: String,
        /// RFC 3339 time the price starts [default: now]
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        effective_from: Option<SystemTime>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum GroupArg {
    Total,
    Model,
    Day,
    Hour,
    ModelDay,
    ModelHour,
}

fn client(ctx: &Ctx) -> BillingClient<Channel> {
    BillingClient::new(ctx.channel.clone())
}

/// `--monthly-budget`: "250.00" (the plan's currency, filled in by the
/// gateway) or "250.00 EUR".
pub fn budget_amount(text: &str) -> anyhow::Result<Money> {
    let mut words = text.split_whitespace();
    let amount = words.next().unwrap_or_default();
    let currency = words.next().unwrap_or_default().to_ascii_uppercase();
    if words.next().is_some() {
        anyhow::bail!(
            "--monthly-budget {text:?}: an amount, optionally followed by its currency code, such as 250.00 or \"250.00 EUR\""
        );
    }
    decimal("monthly-budget", amount, &currency)
}

fn decimal(flag: &str, text: &str, currency: &str) -> anyhow::Result<Money> {
    let nanos = money::parse_decimal(text)
        .with_context(|| format!("--{flag} {text:?}: a decimal amount such as 0.08"))?;
    Ok(Money {
        currency_code: currency.to_owned(),
        amount_nanos: nanos,
    })
}

pub async fn price(ctx: &Ctx, command: PriceCommand) -> anyhow::Result<()> {
    match command {
        PriceCommand::List => {
            let plans = client(ctx)
                .list_price_plans(ctx.admin(ListPricePlansRequest {})?)
                .await
                .map_err(|s| ctx.rpc_error(s))?
                .into_inner()
                .plans;
            output::price_plans(ctx.output, plans)
        }
        PriceCommand::Put {
            plan,
            model,
            device_class,
            prompt,
            cached_prompt,
            completion,
            per_kwh,
            currency,
            description,
            effective_from,
        } => {
            let prompt_price = decimal("prompt", &prompt, &currency)?;
            let cached_price = cached_prompt
                .as_deref()
                .map(|text| decimal("cached-prompt", text, &currency))
                .transpose()?;
            if let Some(cached) = &cached_price
                && cached.amount_nanos > prompt_price.amount_nanos
            {
                eprintln!(
                    "warning: --cached-prompt {} is above --prompt {prompt}: a prompt served from \
                     the cache will cost more than one computed",
                    cached_prompt.as_deref().unwrap_or_default()
                );
            }
            let price = Price {
                model,
                device_class,
                prompt_per_million_tokens: Some(prompt_price),
                cached_prompt_per_million_tokens: cached_price,
                completion_per_million_tokens: Some(decimal("completion", &completion, &currency)?),
                per_kwh: per_kwh
                    .map(|text| decimal("per-kwh", &text, &currency))
                    .transpose()?,
                effective_from: effective_from.map(prost_types::Timestamp::from),
            };
            let plan = client(ctx)
                .put_prices(ctx.admin(PutPricesRequest {
                    plan,
                    currency_code: currency,
                    description,
                    prices: vec![price],
                })?)
                .await
                .map_err(|s| ctx.rpc_error(s))?
                .into_inner();
            output::price_plans(ctx.output, vec![plan])
        }
    }
}

pub async fn invoice(ctx: &Ctx, command: InvoiceCommand) -> anyhow::Result<()> {
    let mut client = client(ctx);
    match command {
        InvoiceCommand::List {
            tenant,
            period,
            status,
        } => {
            let status = match status {
                None => InvoiceStatus::Unspecified,
                Some(InvoiceStatusArg::Draft) => InvoiceStatus::Draft,
                Some(InvoiceStatusArg::Finalized) => InvoiceStatus::Finalized,
            };
            let invoices = all_pages(|page_token| {
                let mut client = client.clone();
                let request = ListInvoicesRequest {
                    tenant: tenant.clone().unwrap_or_default(),
                    period: period.clone().unwrap_or_default(),
                    status: status.into(),
                    page_size: 500,
                    page_token,
                };
                async move {
                    let page = client
                        .list_invoices(ctx.admin(request)?)
                        .await
                        .map_err(|s| ctx.rpc_error(s))?
                        .into_inner();
                    Ok((page.invoices, page.next_page_token))
                }
            })
            .await?;
            output::invoices(ctx.output, invoices)
        }
        InvoiceCommand::Show {
            invoice_id,
            tenant,
            period,
        } => {
            if invoice_id.is_none() && (tenant.is_none() || period.is_none()) {
                bail!("give an invoice id, or --tenant and --period");
            }
            let invoice = client
                .get_invoice(ctx.admin(GetInvoiceRequest {
                    invoice_id: invoice_id.unwrap_or_default(),
                    tenant: tenant.unwrap_or_default(),
                    period: period.unwrap_or_default(),
                })?)
                .await
                .map_err(|s| ctx.rpc_error(s))?
                .into_inner();
            output::invoice(ctx.output, invoice)
        }
        InvoiceCommand::Finalize { invoice_id } => {
            let invoice = client
                .finalize_invoice(ctx.admin(FinalizeInvoiceRequest { invoice_id })?)
                .await
                .map_err(|s| ctx.rpc_error(s))?
                .into_inner();
            output::invoice(ctx.output, invoice)
        }
    }
}

/// Start of the current hour and of the current month, UTC, in seconds.
fn this_month_so_far() -> (i64, i64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let now = i64::try_from(now).unwrap_or(0);
    let month_start =
        ascend_gateway::calendar::Month::of_us(now * 1_000_000).start_us() / 1_000_000;
    (month_start, (now / 3600 + 1) * 3600)
}

fn timestamp_arg(
    flag: &str,
    text: Option<String>,
    default: i64,
) -> anyhow::Result<prost_types::Timestamp> {
    let secs = match text {
        None => default,
        Some(text) => {
            let at = humantime::parse_rfc3339_weak(&text).with_context(|| {
                format!(
                    "--{flag} {text:?}: an RFC 3339 time on the hour, e.g. 2026-11-01T00:00:00Z"
                )
            })?;
            let secs = at
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs();
            i64::try_from(secs).unwrap_or(0)
        }
    };
    Ok(prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    })
}

pub async fn usage(
    ctx: &Ctx,
    tenant: String,
    from: Option<String>,
    to: Option<String>,
    by: GroupArg,
    model: Option<String>,
) -> anyhow::Result<()> {
    let (month_start, next_hour) = this_month_so_far();
    let group_by = match by {
        GroupArg::Total => UsageGrouping::Unspecified,
        GroupArg::Model => UsageGrouping::Model,
        GroupArg::Day => UsageGrouping::Day,
        GroupArg::Hour => UsageGrouping::Hour,
        GroupArg::ModelDay => UsageGrouping::ModelDay,
        GroupArg::ModelHour => UsageGrouping::ModelHour,
    };
    let usage = client(ctx)
        .get_usage(ctx.admin(GetUsageRequest {
            tenant,
            start_time: Some(timestamp_arg("from", from, month_start)?),
            end_time: Some(timestamp_arg("to", to, next_hour)?),
            group_by: group_by.into(),
            model: model.unwrap_or_default(),
        })?)
        .await
        .map_err(|s| ctx.rpc_error(s))?
        .into_inner();
    output::usage(ctx.output, usage)
}

/// A progress bar on stderr when it is a terminal; hidden otherwise.
fn progress(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} rows ({per_sec}, {eta})")
    {
        bar.set_style(style);
    }
    bar
}

/// Receives every message of an export stream into `file`, chunk by chunk.
async fn receive<M, R: Record>(
    ctx: &Ctx,
    mut stream: tonic::Streaming<M>,
    mut file: ExportFile<R>,
    split: impl Fn(M) -> (Option<u64>, Vec<R>),
) -> anyhow::Result<u64> {
    let mut bar = ProgressBar::hidden();
    loop {
        let message = tokio::select! {
            message = stream.message() => message.map_err(|s| ctx.rpc_error(s))?,
            _ = tokio::signal::ctrl_c() => bail!("interrupted; no file was written"),
        };
        let Some(message) = message else { break };
        let (total, records) = split(message);
        if let Some(total) = total {
            bar = progress(total);
        }
        file.write_chunk(&records)?;
        bar.inc(records.len() as u64);
    }
    bar.finish_and_clear();
    Ok(file.finish()?)
}

pub async fn billing(ctx: &Ctx, command: BillingCommand) -> anyhow::Result<()> {
    let (period, tenant, kind, format, out) = match command {
        BillingCommand::Balance { tenant } => {
            let balance = client(ctx)
                .get_balance(ctx.admin(pb::GetBalanceRequest {
                    tenant: tenant.unwrap_or_default(),
                })?)
                .await
                .map_err(|s| ctx.rpc_error(s))?
                .into_inner();
            return output::balance(ctx.output, balance);
        }
        BillingCommand::Archive { period } => {
            let archive = client(ctx)
                .archive_usage(ctx.admin(pb::ArchiveUsageRequest { period })?)
                .await
                .map_err(|s| ctx.rpc_error(s))?
                .into_inner();
            return output::usage_archive(ctx.output, archive);
        }
        BillingCommand::Restore { period } => {
            let archive = client(ctx)
                .restore_usage(ctx.admin(pb::RestoreUsageRequest { period })?)
                .await
                .map_err(|s| ctx.rpc_error(s))?
                .into_inner();
            return output::usage_archive(ctx.output, archive);
        }
        BillingCommand::Export {
            period,
            tenant,
            kind,
            format,
            out,
        } => (period, tenant, kind, format, out),
    };
    let format = match format {
        FormatArg::Csv => FileFormat::Csv,
        FormatArg::Jsonl => FileFormat::Jsonl,
        FormatArg::Parquet => FileFormat::Parquet,
    };
    let request = ExportRequest {
        period,
        tenant: tenant.unwrap_or_default(),
    };
    let mut client = client(ctx);
    let rows = match kind {
        ExportKind::Lines => {
            let stream = client
                .export_invoice_lines(ctx.admin(request)?)
                .await
                .map_err(|s| ctx.rpc_error(s))?
                .into_inner();
            let file = ExportFile::<LineRecord>::create(&out, format)?;
            receive(ctx, stream, file, |m| {
                let lines = m.lines.iter().map(|l| LineRecord::from(&line_from_pb(l)));
                (m.total_rows, lines.collect())
            })
            .await?
        }
        ExportKind::Events => {
            let stream = client
                .export_usage_events(ctx.admin(request)?)
                .await
                .map_err(|s| ctx.rpc_error(s))?
                .into_inner();
            let file = ExportFile::<EventRecord>::create(&out, format)?;
            receive(ctx, stream, file, |m| {
                let events = m
                    .events
                    .iter()
                    .map(|e| EventRecord::from(&event_from_pb(e)));
                (m.total_rows, events.collect())
            })
            .await?
        }
    };
    eprintln!("wrote {rows} rows to {}", out.display());
    Ok(())
}
