//! The command tree and what each command sends to the gateway.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use ascend_gateway::api::pb::v1::tenant_admin_client::TenantAdminClient;
use ascend_gateway::api::pb::v1::{
    BudgetAlerts, CacheScope, CreateApiKeyRequest, CreateTenantRequest, DeleteTenantRequest,
    GetTenantRequest, ListApiKeysRequest, ListAuditEventsRequest, ListTenantsRequest,
    ResumeTenantRequest, RevokeApiKeyRequest, RotateApiKeyRequest, SuspendTenantRequest,
    TenantLimits, TenantStatus, UpdateTenantRequest,
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::billing::{self, BillingCommand, GroupArg, InvoiceCommand, PriceCommand};
use crate::output::{self, Output};
use crate::settings;

#[derive(Parser)]
#[command(
    name = "ascendctl",
    version,
    about = "Administer an Ascend Gateway: tenants, API keys, audit log, prices, invoices, exports, webhooks"
)]
pub struct Cli {
    /// Gateway address [default: http://127.0.0.1:50051]
    #[arg(long, env = "ASCENDCTL_ENDPOINT", global = true)]
    endpoint: Option<String>,
    /// The operator's admin token
    #[arg(
        long,
        env = "ASCENDCTL_ADMIN_TOKEN",
        global = true,
        hide_env_values = true
    )]
    admin_token: Option<String>,
    /// CA certificate (PEM) to trust for an https:// endpoint [default: the Mozilla roots]
    #[arg(long, env = "ASCENDCTL_CA_CERT", global = true)]
    ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with --client-key
    #[arg(long, env = "ASCENDCTL_CLIENT_CERT", global = true)]
    client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS
    #[arg(long, env = "ASCENDCTL_CLIENT_KEY", global = true)]
    client_key: Option<PathBuf>,
    /// Config file with `endpoint`, `admin_token`, `ca_cert`, `client_cert`, `client_key` [default: ~/.config/ascendctl/config.toml]
    #[arg(long, env = "ASCENDCTL_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Output format
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Ask the gateway whether it is serving (needs no token).
    Health,
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Show the admin audit log.
    Audit {
        /// Only events about this tenant (id or slug)
        #[arg(long)]
        tenant: Option<String>,
        /// Most events to show
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Usage totals of a tenant (default: this month so far).
    Usage {
        /// Tenant id or slug
        tenant: String,
        /// Start, RFC 3339 on the hour [default: start of this month]
        #[arg(long)]
        from: Option<String>,
        /// End (exclusive), RFC 3339 on the hour [default: the next hour]
        #[arg(long)]
        to: Option<String>,
        #[arg(long, value_enum, default_value_t = GroupArg::Model)]
        by: GroupArg,
        /// Only this model
        #[arg(long)]
        model: Option<String>,
    },
    /// Price plans and prices.
    #[command(subcommand)]
    Price(PriceCommand),
    /// Invoices: list, show, finalize.
    #[command(subcommand)]
    Invoice(InvoiceCommand),
    /// Billing exports.
    #[command(subcommand)]
    Billing(BillingCommand),
    /// Named operators with roles.
    #[command(subcommand)]
    Operator(crate::operator::OperatorCommand),
    /// Webhook endpoints and their deliveries.
    #[command(subcommand)]
    Webhook(crate::webhook::WebhookCommand),
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
}

/// `--budget-alerts`: "50,80,100", or "default" (an empty list: the
/// gateway's thresholds).
fn parse_budget_alerts(text: &str) -> Result<Vec<u32>, String> {
    if text.trim() == "default" {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|p| {
            p.trim()
                .parse::<u32>()
                .map_err(|_| format!("{p:?}: percentages such as 50,80,100, or \"default\""))
        })
        .collect()
}

#[derive(Args, Default)]
pub struct LimitArgs {
    /// Sustained requests per second
    #[arg(long)]
    rps: Option<f64>,
    /// Requests allowed at once above the rate
    #[arg(long)]
    burst: Option<u32>,
    /// Tokens per minute (prompt + max_tokens reserved at admission)
    #[arg(long)]
    tokens_per_minute: Option<u64>,
    /// Concurrent requests
    #[arg(long)]
    max_concurrent: Option<u32>,
    /// Monthly token quota (hard cap)
    #[arg(long)]
    monthly_quota: Option<u64>,
    /// Monthly spend budget (hard cap), a decimal amount in the currency of
    /// the tenant's price plan, e.g. 250.00 (or "250.00 EUR" to say which)
    #[arg(long, allow_hyphen_values = true, value_name = "AMOUNT")]
    monthly_budget: Option<String>,
}

impl LimitArgs {
    fn is_empty(&self) -> bool {
        self.rps.is_none()
            && self.burst.is_none()
            && self.tokens_per_minute.is_none()
            && self.max_concurrent.is_none()
            && self.monthly_quota.is_none()
            && self.monthly_budget.is_none()
    }

    /// These limits laid over `base`.
    fn over(&self, base: TenantLimits) -> anyhow::Result<TenantLimits> {
        let monthly_budget = match &self.monthly_budget {
            Some(text) => Some(crate::billing::budget_amount(text)?),
            None => base.monthly_budget,
        };
        Ok(TenantLimits {
            requests_per_second: self.rps.or(base.requests_per_second),
            burst: self.burst.or(base.burst),
            tokens_per_minute: self.tokens_per_minute.or(base.tokens_per_minute),
            max_concurrent_requests: self.max_concurrent.or(base.max_concurrent_requests),
            monthly_token_quota: self.monthly_quota.or(base.monthly_token_quota),
            monthly_budget,
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum StatusArg {
    Active,
    Suspended,
    Deleted,
}

#[derive(Subcommand)]
pub enum TenantCommand {
    /// Create a tenant.
    Create {
        /// Unique slug: a-z, 0-9 and '-'
        slug: String,
        /// Display name [default: the slug]
        #[arg(long)]
        name: Option<String>,
        /// Price plan [default: the gateway's default plan]
        #[arg(long)]
        plan: Option<String>,
        /// Scheduling weight (share under contention)
        #[arg(long)]
        weight: Option<u32>,
        #[command(flatten)]
        limits: LimitArgs,
        /// Whose cached prompt prefixes its requests may reuse: its own, or the pool
        /// shared by every tenant so configured (which reveals, through time to first
        /// token, what others sent) [default: tenant]
        #[arg(long, value_enum)]
        cache_scope: Option<CacheScopeArg>,
        /// Percentages of the monthly budget that send budget.threshold_reached
        /// webhooks, e.g. 50,80,100, or "default" [default: the gateway's]
        #[arg(long, value_parser = parse_budget_alerts, value_name = "PERCENTS")]
        budget_alerts: Option<Vec<u32>>,
    },
    /// List tenants (all pages).
    List {
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
    },
    /// Show one tenant.
    Get { tenant: String },
    /// Change a tenant's name, plan, weight or limits.
    Update {
        tenant: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        plan: Option<String>,
        #[arg(long)]
        weight: Option<u32>,
        #[command(flatten)]
        limits: LimitArgs,
        /// Remove a limit (e.g. requests_per_second); repeatable
        #[arg(long = "clear-limit", value_name = "LIMIT")]
        clear_limits: Vec<String>,
        #[arg(long, value_enum)]
        cache_scope: Option<CacheScopeArg>,
        /// Percentages of the monthly budget that send budget.threshold_reached
        /// webhooks, e.g. 50,80,100, or "default" [default: the gateway's]
        #[arg(long, value_parser = parse_budget_alerts, value_name = "PERCENTS")]
        budget_alerts: Option<Vec<u32>>,
    },
    /// Suspend a tenant: its keys are refused until it is resumed.
    Suspend {
        tenant: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Resume a suspended tenant.
    Resume { tenant: String },
    /// Delete a tenant (soft: usage stays for billing; keys stop at once).
    Delete { tenant: String },
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Create an API key; the key is printed once and never again.
    Create {
        tenant: String,
        #[arg(long, default_value = "default")]
        name: String,
        /// inference, billing:read; repeatable [default: inference]
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Expire after this long, e.g. 90d
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<Duration>,
        /// The key's own limits, inside its tenant's (no --monthly-quota per key)
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Set a key's own limits (the flags given; the others are kept).
    Update {
        key_id: String,
        #[command(flatten)]
        limits: LimitArgs,
        /// Remove a limit kind (a TenantLimits field, e.g. requests_per_second, monthly_budget); repeatable
        #[arg(long = "clear-limit", value_name = "LIMIT")]
        clear_limits: Vec<String>,
    },
    /// List a tenant's keys.
    List {
        tenant: String,
        #[arg(long)]
        include_revoked: bool,
    },
    /// Revoke a key at once.
    Revoke { key_id: String },
    /// Issue a new secret for a key; the old one works for the overlap.
    Rotate {
        key_id: String,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
        overlap: Duration,
    },
}

pub struct Ctx {
    pub channel: Channel,
    endpoint: String,
    admin_token: Option<String>,
    pub output: Output,
}

impl Ctx {
    pub fn admin<T>(&self, message: T) -> anyhow::Result<tonic::Request<T>> {
        let Some(token) = &self.admin_token else {
            bail!(
                "no admin token: pass --admin-token, set ASCENDCTL_ADMIN_TOKEN, or put admin_token in the config file"
            );
        };
        let mut request = tonic::Request::new(message);
        let value = format!("Bearer {token}")
            .parse()
            .context("the admin token has characters a header cannot carry")?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }

    fn client(&self) -> TenantAdminClient<Channel> {
        TenantAdminClient::new(self.channel.clone())
    }

    pub fn rpc_error(&self, status: tonic::Status) -> anyhow::Error {
        match status.code() {
            tonic::Code::Unavailable => anyhow::anyhow!(
                "the gateway at {} is unavailable: {}",
                self.endpoint,
                status.message()
            ),
            code => anyhow::anyhow!("{}: {}", output::code_name(code), status.message()),
        }
    }
}

/// Every page of a listing: `fetch(page_token)` returns one page and the
/// next token, empty after the last page.
pub async fn all_pages<T, Fut>(mut fetch: impl FnMut(String) -> Fut) -> anyhow::Result<Vec<T>>
where
    Fut: Future<Output = anyhow::Result<(Vec<T>, String)>>,
{
    let mut items = Vec::new();
    let mut page_token = String::new();
    loop {
        let (page, next) = fetch(page_token).await?;
        items.extend(page);
        if next.is_empty() {
            return Ok(items);
        }
        page_token = next;
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let resolved = settings::resolve(
        cli.endpoint,
        cli.admin_token,
        settings::TlsFiles {
            ca_cert: cli.ca_cert,
            client_cert: cli.client_cert,
            client_key: cli.client_key,
        },
        cli.config,
    )?;
    let endpoint = tonic::transport::Endpoint::from_shared(resolved.endpoint.clone())
        .with_context(|| {
            format!(
                "invalid endpoint {:?}; use e.g. http://127.0.0.1:50051",
                resolved.endpoint
            )
        })?;
    let channel = crate::tls::configure(endpoint, &resolved)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| {
            format!(
                "cannot reach the gateway at {}; check that it runs and that --endpoint / ASCENDCTL_ENDPOINT point at it",
                resolved.endpoint
            )
        })?;
    let ctx = Ctx {
        channel,
        endpoint: resolved.endpoint,
        admin_token: resolved.admin_token,
        output: cli.output,
    };
    match cli.command {
        Command::Health => health(&ctx).await,
        Command::Tenant(command) => tenant(&ctx, command).await,
        Command::Key(command) => key(&ctx, command).await,
        Command::Audit { tenant, limit } => audit(&ctx, tenant, limit).await,
        Command::Usage {
            tenant,
            from,
            to,
            by,
            model,
        } => billing::usage(&ctx, tenant, from, to, by, model).await,
        Command::Price(command) => billing::price(&ctx, command).await,
        Command::Invoice(command) => billing::invoice(&ctx, command).await,
        Command::Billing(command) => billing::billing(&ctx, command).await,
        Command::Webhook(command) => crate::webhook::webhook(&ctx, command).await,
        Command::Operator(command) => crate::operator::operator(&ctx, command).await,
        Command::Completions { .. } => Ok(()),
    }
}

async fn health(ctx: &Ctx) -> anyhow::Result<()> {
    let response = HealthClient::new(ctx.channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .map_err(|s| ctx.rpc_error(s))?;
    println!("{}", response.into_inner().status().as_str_name());
    Ok(())
}

#[derive(Clone, Copy, ValueEnum)]
pub enum CacheScopeArg {
    Tenant,
    Shared,
}

fn cache_scope_pb(arg: Option<CacheScopeArg>) -> CacheScope {
    match arg {
        None => CacheScope::Unspecified,
        Some(CacheScopeArg::Tenant) => CacheScope::Tenant,
        Some(CacheScopeArg::Shared) => CacheScope::Shared,
    }
}

async fn tenant(ctx: &Ctx, command: TenantCommand) -> anyhow::Result<()> {
    let mut client = ctx.client();
    let tenant = match command {
        TenantCommand::Create {
            slug,
            name,
            plan,
            weight,
            limits,
            cache_scope,
            budget_alerts,
        } => {
            client
                .create_tenant(ctx.admin(CreateTenantRequest {
                    slug,
                    display_name: name.unwrap_or_default(),
                    price_plan: plan.unwrap_or_default(),
                    scheduling_weight: weight,
                    limits: Some(limits.over(TenantLimits::default())?),
                    cache_scope: cache_scope_pb(cache_scope).into(),
                    budget_alerts: budget_alerts.map(|percents| BudgetAlerts { percents }),
                })?)
                .await
        }
        TenantCommand::List { status } => {
            let status = match status {
                None => TenantStatus::Unspecified,
                Some(StatusArg::Active) => TenantStatus::Active,
                Some(StatusArg::Suspended) => TenantStatus::Suspended,
                Some(StatusArg::Deleted) => TenantStatus::Deleted,
            };
            let tenants = all_pages(|page_token| {
                let mut client = client.clone();
                async move {
                    let page = client
                        .list_tenants(ctx.admin(ListTenantsRequest {
                            page_size: 500,
                            page_token,
                            status: status.into(),
                        })?)
                        .await
                        .map_err(|s| ctx.rpc_error(s))?
                        .into_inner();
                    Ok((page.tenants, page.next_page_token))
                }
            })
            .await?;
            return output::tenants(ctx.output, tenants);
        }
        TenantCommand::Get { tenant } => {
            client
                .get_tenant(ctx.admin(GetTenantRequest { tenant })?)
                .await
        }
        TenantCommand::Update {
            tenant,
            name,
            plan,
            weight,
            limits,
            clear_limits,
            cache_scope,
            budget_alerts,
        } => {
            // The API replaces limits whole; merge the flags over the current ones.
            let new_limits = if limits.is_empty() {
                None
            } else {
                let current = client
                    .get_tenant(ctx.admin(GetTenantRequest {
                        tenant: tenant.clone(),
                    })?)
                    .await
                    .map_err(|s| ctx.rpc_error(s))?
                    .into_inner();
                Some(limits.over(current.limits.unwrap_or_default())?)
            };
            client
                .update_tenant(ctx.admin(UpdateTenantRequest {
                    tenant,
                    display_name: name,
                    price_plan: plan,
                    scheduling_weight: weight,
                    limits: new_limits,
                    clear_limits,
                    cache_scope: cache_scope_pb(cache_scope).into(),
                    budget_alerts: budget_alerts.map(|percents| BudgetAlerts { percents }),
                })?)
                .await
        }
        TenantCommand::Suspend { tenant, reason } => {
            client
                .suspend_tenant(ctx.admin(SuspendTenantRequest { tenant, reason })?)
                .await
        }
        TenantCommand::Resume { tenant } => {
            client
                .resume_tenant(ctx.admin(ResumeTenantRequest { tenant })?)
                .await
        }
        TenantCommand::Delete { tenant } => {
            client
                .delete_tenant(ctx.admin(DeleteTenantRequest { tenant })?)
                .await
        }
    };
    let tenant = tenant.map_err(|s| ctx.rpc_error(s))?.into_inner();
    output::tenants(ctx.output, vec![tenant])
}

async fn key(ctx: &Ctx, command: KeyCommand) -> anyhow::Result<()> {
    let mut client = ctx.client();
    match command {
        KeyCommand::Create {
            tenant,
            name,
            scopes,
            expires_in,
            limits,
        } => {
            let expires_at =
                expires_in.map(|ttl| prost_types::Timestamp::from(SystemTime::now() + ttl));
            let issued = client
                .create_api_key(ctx.admin(CreateApiKeyRequest {
                    tenant,
                    name,
                    scopes,
                    expires_at,
                    limits: Some(limits.over(TenantLimits::default())?),
                })?)
                .await
                .map_err(|s| ctx.rpc_error(s))?
                .into_inner();
            output::issued_key(ctx.output, issued)
        }
        KeyCommand::List {
            tenant,
            include_revoked,
        } => {
            let keys = all_pages(|page_token| {
                let (mut client, tenant) = (client.clone(), tenant.clone());
                async move {
                    let page = client
                        .list_api_keys(ctx.admin(ListApiKeysRequest {
                            tenant,
                            include_revoked,
                            page_size: 500,
                            page_token,
                        })?)
                        .await
                        .map_err(|s| ctx.rpc_error(s))?
                        .into_inner();
                    Ok((page.keys, page.next_page_token))
                }
            })
            .await?;
            output::keys(ctx.output, keys)
        }
        KeyCommand::Update {
            key_id,
            limits,
            clear_limits,
        } => {
            let key = client
                .update_api_key(ctx.admin(ascend_gateway::api::pb::v1::UpdateApiKeyRequest {
                    key_id,
                    limits: Some(limits.over(TenantLimits::default())?),
                    clear_limits,
                })?)
                .await
                .map_err(|s| ctx.rpc_error(s))?
                .into_inner();
            output::keys(ctx.output, vec![key])
        }
        KeyCommand::Revoke { key_id } => {
            let key = client
                .revoke_api_key(ctx.admin(RevokeApiKeyRequest { key_id })?)
                .await
                .map_err(|s| ctx.rpc_error(s))?
                .into_inner();
            output::keys(ctx.output, vec![key])
        }
        KeyCommand::Rotate { key_id, overlap } => {
            let overlap_seconds =
                u32::try_from(overlap.as_secs()).context("--overlap is too long")?;
            let issued = client
                .rotate_api_key(ctx.admin(RotateApiKeyRequest {
                    key_id,
                    overlap_seconds: Some(overlap_seconds),
                })?)
                .await
                .map_err(|s| ctx.rpc_error(s))?
                .into_inner();
            output::issued_key(ctx.output, issued)
        }
    }
}

async fn audit(ctx: &Ctx, tenant: Option<String>, limit: u32) -> anyhow::Result<()> {
    let mut events = Vec::new();
    let mut page_token = String::new();
    while events.len() < limit as usize {
        let page = ctx
            .client()
            .list_audit_events(ctx.admin(ListAuditEventsRequest {
                tenant: tenant.clone().unwrap_or_default(),
                page_size: limit.min(1000),
                page_token,
            })?)
            .await
            .map_err(|s| ctx.rpc_error(s))?
            .into_inner();
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    events.truncate(limit as usize);
    output::audit(ctx.output, events)
}
