//! The `Billing` service: usage queries, price plans, invoices, exports.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::pb::v1::billing_server::Billing;
use super::pb::v1::{
    ExportInvoiceLinesResponse, ExportRequest, ExportUsageEventsResponse, FinalizeInvoiceRequest,
    GetInvoiceRequest, GetUsageRequest, GetUsageResponse, Invoice, ListInvoicesRequest,
    ListInvoicesResponse, ListPricePlansRequest, ListPricePlansResponse, PricePlan,
    PutPricesRequest,
};
use super::status::not_implemented;

/// Handlers of `ascend.gateway.v1.Billing`.
#[derive(Debug, Clone, Default)]
pub struct BillingApi {}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Billing for BillingApi {
    async fn get_usage(
        &self,
        _request: Request<GetUsageRequest>,
    ) -> Result<Response<GetUsageResponse>, Status> {
        Err(not_implemented("Billing.GetUsage"))
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
