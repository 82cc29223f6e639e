//! The `Webhooks` service: endpoints and their delivery log, for the admin
//! token only (the auth layer's default for this service).

use super::status::OrStatus;
use tonic::{Request, Response, Status};

use super::convert::{opt_timestamp, timestamp};
use super::pb::v1 as pb;
use super::pb::v1::webhooks_server::Webhooks;
use crate::tenancy::TenancyService;
use crate::webhooks::{DeliveryRecord, Webhook, WebhookService};

/// Handlers of `ascend.gateway.v1.Webhooks`.
#[derive(Clone)]
pub struct WebhooksApi {
    webhooks: WebhookService,
    tenancy: TenancyService,
}

impl WebhooksApi {
    pub fn new(webhooks: WebhookService, tenancy: TenancyService) -> WebhooksApi {
        WebhooksApi { webhooks, tenancy }
    }

    /// The tenant id a `tenant` field names; `None` when it is empty.
    async fn tenant_id(&self, tenant: &str) -> Result<Option<String>, Status> {
        if tenant.is_empty() {
            return Ok(None);
        }
        let tenant = self.tenancy.get_tenant(tenant).await.or_status()?;
        Ok(Some(tenant.id))
    }
}

fn webhook_pb(w: Webhook) -> pb::Webhook {
    pb::Webhook {
        id: w.id,
        tenant_id: w.tenant_id.unwrap_or_default(),
        url: w.url,
        events: w.events.iter().map(|e| e.as_str().to_owned()).collect(),
        created_at: Some(timestamp(w.created_at_us)),
    }
}

fn delivery_pb(d: DeliveryRecord) -> pb::WebhookDelivery {
    let pending = d.delivered_at_us.is_none() && d.failed_at_us.is_none();
    pb::WebhookDelivery {
        event_id: d.event_id,
        event_type: d.event_type,
        attempts: u32::try_from(d.attempts).unwrap_or(u32::MAX),
        delivered_at: opt_timestamp(d.delivered_at_us),
        failed_at: opt_timestamp(d.failed_at_us),
        last_status: d
            .last_status
            .and_then(|s| u32::try_from(s).ok())
            .unwrap_or(0),
        last_error: d.last_error,
        next_attempt_at: pending.then(|| timestamp(d.next_attempt_at_us)),
        event_created_at: Some(timestamp(d.event_created_at_us)),
    }
}

fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!(
            "invalid `{field}`: required (a webhook id)"
        )));
    }
    Ok(value)
}

#[tonic::async_trait]
impl Webhooks for WebhooksApi {
    async fn create_webhook(
        &self,
        request: Request<pb::CreateWebhookRequest>,
    ) -> Result<Response<pb::CreateWebhookResponse>, Status> {
        let r = request.into_inner();
        let tenant_id = self.tenant_id(&r.tenant).await?;
        let (webhook, secret) = self
            .webhooks
            .create(tenant_id.as_deref(), &r.url, &r.events)
            .await
            .or_status()?;
        Ok(Response::new(pb::CreateWebhookResponse {
            webhook: Some(webhook_pb(webhook)),
            signing_secret: secret,
        }))
    }

    async fn list_webhooks(
        &self,
        request: Request<pb::ListWebhooksRequest>,
    ) -> Result<Response<pb::ListWebhooksResponse>, Status> {
        let tenant_id = self.tenant_id(&request.into_inner().tenant).await?;
        let webhooks = self.webhooks.list(tenant_id.as_deref()).await.or_status()?;
        Ok(Response::new(pb::ListWebhooksResponse {
            webhooks: webhooks.into_iter().map(webhook_pb).collect(),
        }))
    }

    async fn delete_webhook(
        &self,
        request: Request<pb::DeleteWebhookRequest>,
    ) -> Result<Response<pb::DeleteWebhookResponse>, Status> {
        let r = request.into_inner();
        self.webhooks
            .delete(required("id", &r.id)?)
            .await
            .or_status()?;
        Ok(Response::new(pb::DeleteWebhookResponse {}))
    }

    async fn test_webhook(
        &self,
        request: Request<pb::TestWebhookRequest>,
    ) -> Result<Response<pb::TestWebhookResponse>, Status> {
        let r = request.into_inner();
        let event_id = self
            .webhooks
            .test(required("id", &r.id)?)
            .await
            .or_status()?;
        Ok(Response::new(pb::TestWebhookResponse { event_id }))
    }

    async fn list_webhook_deliveries(
        &self,
        request: Request<pb::ListWebhookDeliveriesRequest>,
    ) -> Result<Response<pb::ListWebhookDeliveriesResponse>, Status> {
        let r = request.into_inner();
        let deliveries = self
            .webhooks
            .deliveries(required("id", &r.id)?, r.page_size)
            .await
            .or_status()?;
        Ok(Response::new(pb::ListWebhookDeliveriesResponse {
            deliveries: deliveries.into_iter().map(delivery_pb).collect(),
        }))
    }
}
