//! The `TenantAdmin` service: tenants, API keys, the audit log.

use tonic::{Request, Response, Status};

use super::pb::v1::tenant_admin_server::TenantAdmin;
use super::pb::v1::{
    ApiKey, CreateApiKeyRequest, CreateApiKeyResponse, CreateTenantRequest, DeleteTenantRequest,
    GetTenantRequest, ListApiKeysRequest, ListApiKeysResponse, ListAuditEventsRequest,
    ListAuditEventsResponse, ListTenantsRequest, ListTenantsResponse, ResumeTenantRequest,
    RevokeApiKeyRequest, RotateApiKeyRequest, SuspendTenantRequest, Tenant, UpdateTenantRequest,
};
use super::status::not_implemented;

/// Handlers of `ascend.gateway.v1.TenantAdmin`.
#[derive(Debug, Clone, Default)]
pub struct TenantAdminApi {}

#[tonic::async_trait]
impl TenantAdmin for TenantAdminApi {
    async fn create_tenant(
        &self,
        _request: Request<CreateTenantRequest>,
    ) -> Result<Response<Tenant>, Status> {
        Err(not_implemented("TenantAdmin.CreateTenant"))
    }

    async fn get_tenant(
        &self,
        _request: Request<GetTenantRequest>,
    ) -> Result<Response<Tenant>, Status> {
        Err(not_implemented("TenantAdmin.GetTenant"))
    }

    async fn list_tenants(
        &self,
        _request: Request<ListTenantsRequest>,
    ) -> Result<Response<ListTenantsResponse>, Status> {
        Err(not_implemented("TenantAdmin.ListTenants"))
    }

    async fn update_tenant(
        &self,
        _request: Request<UpdateTenantRequest>,
    ) -> Result<Response<Tenant>, Status> {
        Err(not_implemented("TenantAdmin.UpdateTenant"))
    }

    async fn suspend_tenant(
        &self,
        _request: Request<SuspendTenantRequest>,
    ) -> Result<Response<Tenant>, Status> {
        Err(not_implemented("TenantAdmin.SuspendTenant"))
    }

    async fn resume_tenant(
        &self,
        _request: Request<ResumeTenantRequest>,
    ) -> Result<Response<Tenant>, Status> {
        Err(not_implemented("TenantAdmin.ResumeTenant"))
    }

    async fn delete_tenant(
        &self,
        _request: Request<DeleteTenantRequest>,
    ) -> Result<Response<Tenant>, Status> {
        Err(not_implemented("TenantAdmin.DeleteTenant"))
    }

    async fn create_api_key(
        &self,
        _request: Request<CreateApiKeyRequest>,
    ) -> Result<Response<CreateApiKeyResponse>, Status> {
        Err(not_implemented("TenantAdmin.CreateApiKey"))
    }

    async fn list_api_keys(
        &self,
        _request: Request<ListApiKeysRequest>,
    ) -> Result<Response<ListApiKeysResponse>, Status> {
        Err(not_implemented("TenantAdmin.ListApiKeys"))
    }

    async fn revoke_api_key(
        &self,
        _request: Request<RevokeApiKeyRequest>,
    ) -> Result<Response<ApiKey>, Status> {
        Err(not_implemented("TenantAdmin.RevokeApiKey"))
    }

    async fn rotate_api_key(
        &self,
        _request: Request<RotateApiKeyRequest>,
    ) -> Result<Response<CreateApiKeyResponse>, Status> {
        Err(not_implemented("TenantAdmin.RotateApiKey"))
    }

    async fn list_audit_events(
        &self,
        _request: Request<ListAuditEventsRequest>,
    ) -> Result<Response<ListAuditEventsResponse>, Status> {
        Err(not_implemented("TenantAdmin.ListAuditEvents"))
    }
}
