//! `ascendctl operator`: named operators with roles, each with a token of
//! its own, so the audit log says who did what.

use ascend_gateway::api::pb::v1 as pb;
use ascend_gateway::api::pb::v1::tenant_admin_client::TenantAdminClient;
use clap::{Subcommand, ValueEnum};
use serde::Serialize;

use crate::commands::Ctx;
use crate::output::{Output, or_dash, print_json, print_table, time};

#[derive(Clone, Copy, ValueEnum)]
pub enum RoleArg {
    /// Everything
    Admin,
    /// Prices, invoices, exports and finalization, and the reads
    Billing,
    /// Read-only: tenants, keys, usage, invoices, the audit log
    Viewer,
}

#[derive(Subcommand)]
pub enum OperatorCommand {
    /// Create an operator; its token is printed once and never again.
    Create {
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
    },
    /// List operators.
    List,
    /// Revoke an operator (id or name) at once.
    Revoke { operator: String },
}

#[derive(Serialize)]
struct OperatorView {
    id: String,
    name: String,
    role: String,
    created_at: Option<String>,
    revoked_at: Option<String>,
}

impl From<pb::Operator> for OperatorView {
    fn from(o: pb::Operator) -> OperatorView {
        OperatorView {
            created_at: time(o.created_at.as_ref()),
            revoked_at: time(o.revoked_at.as_ref()),
            id: o.id,
            name: o.name,
            role: o.role,
        }
    }
}

fn show(out: Output, operators: Vec<pb::Operator>) -> anyhow::Result<()> {
    let views: Vec<OperatorView> = operators.into_iter().map(OperatorView::from).collect();
    if out == Output::Json {
        return print_json(&views);
    }
    let rows = views
        .into_iter()
        .map(|o| {
            vec![
                o.name,
                o.role,
                o.id,
                or_dash(o.created_at),
                or_dash(o.revoked_at),
            ]
        })
        .collect();
    print_table(&["NAME", "ROLE", "ID", "CREATED", "REVOKED"], rows);
    Ok(())
}

pub async fn operator(ctx: &Ctx, command: OperatorCommand) -> anyhow::Result<()> {
    let mut client = TenantAdminClient::new(ctx.channel.clone());
    match command {
        OperatorCommand::Create { name, role } => {
            let role = match role {
                RoleArg::Admin => "admin",
                RoleArg::Billing => "billing",
                RoleArg::Viewer => "viewer",
            };
            let created = client
                .create_operator(ctx.admin(pb::CreateOperatorRequest {
                    name,
                    role: role.to_owned(),
                })?)
                .await
                .map_err(|s| ctx.rpc_error(s))?
                .into_inner();
            let operator = OperatorView::from(created.operator.unwrap_or_default());
            if ctx.output == Output::Json {
                #[derive(Serialize)]
                struct Created {
                    operator: OperatorView,
                    token: String,
                }
                return print_json(&Created {
                    operator,
                    token: created.token,
                });
            }
            println!("Operator {} ({}) created.", operator.name, operator.role);
            println!("Token (shown only now; use it as --admin-token):");
            println!("{}", created.token);
            Ok(())
        }
        OperatorCommand::List => {
            let operators = client
                .list_operators(ctx.admin(pb::ListOperatorsRequest {})?)
                .await
                .map_err(|s| ctx.rpc_error(s))?
                .into_inner()
                .operators;
            show(ctx.output, operators)
        }
        OperatorCommand::Revoke { operator } => {
            let revoked = client
                .revoke_operator(ctx.admin(pb::RevokeOperatorRequest { operator })?)
                .await
                .map_err(|s| ctx.rpc_error(s))?
                .into_inner();
            show(ctx.output, vec![revoked])
        }
    }
}
