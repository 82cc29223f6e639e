//! `ascendctl webhook`: register, list, delete and test endpoints, and read
//! their delivery log.

use ascend_gateway::api::pb::v1 as pb;
use ascend_gateway::api::pb::v1::webhooks_client::WebhooksClient;
use clap::Subcommand;
use tonic::transport::Channel;

use crate::commands::Ctx;
use crate::output::{Output, or_dash, print_json, print_table, time};
use serde::Serialize;

#[derive(Subcommand)]
pub enum WebhookCommand {
    /// Register an endpoint; prints its signing secret, this once.
    Create {
        /// http(s) URL the events are POSTed to
        #[arg(long)]
        url: String,
        /// Event types, comma-separated or repeated: budget.threshold_reached,
        /// quota.exhausted, invoice.finalized, api_key.expiring,
        /// tenant.suspended
        #[arg(long, value_delimiter = ',', required = true)]
        events: Vec<String>,
        /// Only this tenant's events (id or slug) [default: every tenant's]
        #[arg(long)]
        tenant: Option<String>,
    },
    /// List endpoints.
    List {
        /// Only this tenant's (id or slug)
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Delete an endpoint; its pending deliveries are given up.
    Delete { id: String },
    /// Send a `webhook.test` event to an endpoint.
    Test { id: String },
    /// An endpoint's delivery log, newest first.
    Deliveries {
        id: String,
        /// Most deliveries to show (1 to 1000)
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

fn client(ctx: &Ctx) -> WebhooksClient<Channel> {
    WebhooksClient::new(ctx.channel.clone())
}

pub async fn webhook(ctx: &Ctx, command: WebhookCommand) -> anyhow::Result<()> {
    let mut client = client(ctx);
    match command {
        WebhookCommand::Create {
            url,
            events,
            tenant,
        } => {
            let created = client
                .create_webhook(ctx.admin(pb::CreateWebhookRequest {
                    tenant: tenant.unwrap_or_default(),
                    url,
                    events,
                })?)
                .await
                .map_err(|s| ctx.rpc_error(s))?
                .into_inner();
            created_view(ctx.output, created)
        }
        WebhookCommand::List { tenant } => {
            let webhooks = client
                .list_webhooks(ctx.admin(pb::ListWebhooksRequest {
                    tenant: tenant.unwrap_or_default(),
                })?)
                .await
                .map_err(|s| ctx.rpc_error(s))?
                .into_inner()
                .webhooks;
            list_view(ctx.output, webhooks)
        }
        WebhookCommand::Delete { id } => {
            client
                .delete_webhook(ctx.admin(pb::DeleteWebhookRequest { id: id.clone() })?)
                .await
                .map_err(|s| ctx.rpc_error(s))?;
            done(ctx.output, &format!("webhook {id} deleted"))
        }
        WebhookCommand::Test { id } => {
            let event_id = client
                .test_webhook(ctx.admin(pb::TestWebhookRequest { id })?)
                .await
                .map_err(|s| ctx.rpc_error(s))?
                .into_inner()
                .event_id;
            done(ctx.output, &format!("test event {event_id} queued"))
        }
        WebhookCommand::Deliveries { id, limit } => {
            let deliveries = client
                .list_webhook_deliveries(ctx.admin(pb::ListWebhookDeliveriesRequest {
                    id,
                    page_size: limit,
                })?)
                .await
                .map_err(|s| ctx.rpc_error(s))?
                .into_inner()
                .deliveries;
            deliveries_view(ctx.output, deliveries)
        }
    }
}

#[derive(Serialize)]
struct WebhookView {
    id: String,
    /// Empty: every tenant's events.
    tenant_id: String,
    url: String,
    events: Vec<String>,
    created_at: Option<String>,
}

impl From<pb::Webhook> for WebhookView {
    fn from(w: pb::Webhook) -> WebhookView {
        WebhookView {
            created_at: time(w.created_at.as_ref()),
            id: w.id,
            tenant_id: w.tenant_id,
            url: w.url,
            events: w.events,
        }
    }
}

#[derive(Serialize)]
struct CreatedView {
    #[serde(flatten)]
    webhook: WebhookView,
    signing_secret: String,
}

fn created_view(out: Output, created: pb::CreateWebhookResponse) -> anyhow::Result<()> {
    let webhook = WebhookView::from(created.webhook.unwrap_or_default());
    if out == Output::Json {
        return print_json(&CreatedView {
            webhook,
            signing_secret: created.signing_secret,
        });
    }
    println!("Webhook {} created for {}.", webhook.id, webhook.url);
    println!("Signing secret (shown only now; keep it to verify Ascend-Signature):");
    println!("{}", created.signing_secret);
    Ok(())
}

fn list_view(out: Output, webhooks: Vec<pb::Webhook>) -> anyhow::Result<()> {
    let views: Vec<WebhookView> = webhooks.into_iter().map(WebhookView::from).collect();
    if out == Output::Json {
        return print_json(&views);
    }
    let rows = views
        .into_iter()
        .map(|w| {
            vec![
                w.id,
                if w.tenant_id.is_empty() {
                    "(all)".to_owned()
                } else {
                    w.tenant_id
                },
                w.url,
                w.events.join(","),
                or_dash(w.created_at),
            ]
        })
        .collect();
    print_table(&["ID", "TENANT", "URL", "EVENTS", "CREATED"], rows);
    Ok(())
}

#[derive(Serialize)]
struct DeliveryView {
    event_id: String,
    event_type: String,
    /// delivered, pending or failed.
    state: &'static str,
    attempts: u32,
    last_status: Option<u32>,
    last_error: String,
    delivered_at: Option<String>,
    failed_at: Option<String>,
    next_attempt_at: Option<String>,
    event_created_at: Option<String>,
}

fn deliveries_view(out: Output, deliveries: Vec<pb::WebhookDelivery>) -> anyhow::Result<()> {
    let views: Vec<DeliveryView> = deliveries
        .into_iter()
        .map(|d| DeliveryView {
            state: match (&d.delivered_at, &d.failed_at) {
                (Some(_), _) => "delivered",
                (None, Some(_)) => "failed",
                (None, None) => "pending",
            },
            delivered_at: time(d.delivered_at.as_ref()),
            failed_at: time(d.failed_at.as_ref()),
            next_attempt_at: time(d.next_attempt_at.as_ref()),
            event_created_at: time(d.event_created_at.as_ref()),
            last_status: (d.last_status != 0).then_some(d.last_status),
            event_id: d.event_id,
            event_type: d.event_type,
            attempts: d.attempts,
            last_error: d.last_error,
        })
        .collect();
    if out == Output::Json {
        return print_json(&views);
    }
    let rows = views
        .into_iter()
        .map(|d| {
            vec![
                d.event_id,
                d.event_type,
                d.state.to_owned(),
                d.attempts.to_string(),
                or_dash(d.last_status),
                if d.last_error.is_empty() {
                    "-".to_owned()
                } else {
                    d.last_error
                },
                or_dash(d.delivered_at.or(d.next_attempt_at)),
            ]
        })
        .collect();
    print_table(
        &[
            "EVENT",
            "TYPE",
            "STATE",
            "ATTEMPTS",
            "STATUS",
            "LAST ERROR",
            "DELIVERED / NEXT",
        ],
        rows,
    );
    Ok(())
}

fn done(out: Output, message: &str) -> anyhow::Result<()> {
    if out == Output::Json {
        return print_json(&serde_json::json!({ "ok": true, "message": message }));
    }
    println!("{message}");
    Ok(())
}
