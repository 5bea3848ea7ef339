"""gRPC Registry servicer: converts protobuf ⇄ domain types, checks the admin token, calls the Registry."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from maas.v1 import registry_pb2 as pb
from maas.v1 import registry_pb2_grpc
from services.registry import convert
from services.registry.auth import AdminAuth
from services.registry.registry import Registry
from services.registry.tenants import Tenants
from services.shared.errors import InvalidArgument
from services.shared.telemetry import annotate


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    def __init__(self, registry: Registry, auth: AdminAuth, tenants: Tenants | None = None):
        self.registry = registry
        self.auth = auth
        self.tenants = tenants or Tenants(registry.store)

    def _admin(self, context: grpc.aio.ServicerContext) -> None:
        self.auth.check(context.invocation_metadata())

    async def RegisterVersion(self, request_iterator: AsyncIterator[pb.RegisterVersionRequest], context):
        self._admin(context)
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("the first RegisterVersion message must be the header")
        req = convert.registration_in(first.header)
        annotate(model=req.model)

        async def chunks():
            async for message in request_iterator:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidArgument("only chunks may follow the header")
                yield message.chunk

        version = await self.registry.register(req, chunks())
        annotate(version=version.version)
        return convert.version_out(version)

    async def ListModels(self, request: pb.ListModelsRequest, context):
        models = self.registry.list_models(request.include_archived)
        return pb.ListModelsResponse(models=[convert.model_out(m) for m in models])

    async def GetModel(self, request: pb.GetModelRequest, context):
        annotate(model=request.model)
        return convert.model_out(self.registry.get_model(request.model))

    async def GetVersion(self, request: pb.GetVersionRequest, context):
        annotate(model=request.model, version=request.version)
        return convert.version_out(self.registry.get_version(request.model, request.version))

    async def SetAlias(self, request: pb.SetAliasRequest, context):
        self._admin(context)
        annotate(model=request.model, version=request.version)
        alias = await self.registry.set_alias(
            request.model, request.alias, request.version, request.actor, request.reason
        )
        return convert.alias_out(alias)

    async def SetTrafficPolicy(self, request: pb.SetTrafficPolicyRequest, context):
        self._admin(context)
        annotate(model=request.model)
        shadow = (
            convert.target_in(request.shadow.target)
            if request.HasField("shadow") and request.shadow.HasField("target")
            else None
        )
        policy = await self.registry.set_traffic_policy(
            request.model,
            [convert.target_in(t) for t in request.split],
            shadow,
            request.shadow.fraction,
            request.actor,
            request.reason,
        )
        return convert.policy_out(policy)

    async def Rollback(self, request: pb.RollbackRequest, context):
        self._admin(context)
        annotate(model=request.model)
        return convert.alias_out(
            await self.registry.rollback(request.model, request.alias, request.actor, request.reason)
        )

    async def ArchiveVersion(self, request: pb.ArchiveVersionRequest, context):
        self._admin(context)
        annotate(model=request.model, version=request.version)
        return convert.version_out(
            await self.registry.archive(request.model, request.version, request.actor, request.reason)
        )

    async def ReportShadowResults(self, request: pb.ReportShadowResultsRequest, context):
        self._admin(context)
        self.registry.report_shadow_results([convert.shadow_result_in(r) for r in request.results])
        return pb.ReportShadowResultsResponse()

    async def Watch(self, request: pb.WatchRequest, context):
        async for event in self.registry.watch():
            yield convert.watch_event_out(event)

    # -- progressive delivery (rollout.py) --------------------------------------------------------
    async def ReportVersionStats(self, request: pb.ReportVersionStatsRequest, context):
        self._admin(context)
        self.registry.rollouts.report([convert.version_stats_in(s) for s in request.stats])
        return pb.ReportVersionStatsResponse()

    async def StartRollout(self, request: pb.StartRolloutRequest, context):
        self._admin(context)
        annotate(model=request.model, version=request.version)
        rollout = await self.registry.rollouts.start_rollout(
            request.model,
            request.version,
            convert.rollout_policy_in(request.policy),
            request.dry_run,
            request.actor,
            request.reason,
        )
        return convert.rollout_out(rollout)

    async def GetRollout(self, request: pb.GetRolloutRequest, context):
        annotate(model=request.model)
        return convert.rollout_out(self.registry.rollouts.get(request.model))

    async def ListRollouts(self, request: pb.ListRolloutsRequest, context):
        return pb.ListRolloutsResponse(rollouts=[convert.rollout_out(r) for r in self.registry.rollouts.list()])

    async def AbortRollout(self, request: pb.AbortRolloutRequest, context):
        self._admin(context)
        annotate(model=request.model)
        return convert.rollout_out(await self.registry.rollouts.abort(request.model, request.actor, request.reason))

    async def CompareVersions(self, request: pb.CompareVersionsRequest, context):
        annotate(model=request.model)
        return convert.shadow_report_out(
            self.registry.shadow_reports.compare(self.registry.store, request.model, request.a, request.b)
        )

    async def OptimizeVersion(self, request: pb.OptimizeVersionRequest, context):
        from services.registry.optimize import optimize

        self._admin(context)
        annotate(model=request.model, version=request.from_version)
        given = {name for name in convert.POLICY_FIELDS if request.policy.HasField(name)}
        done = await optimize(
            self.registry,
            request.model,
            request.from_version,
            request.int8,
            convert.rollout_policy_in(request.policy),
            given,
            request.actor,
            request.reason,
            fp16=request.fp16,
            int4=request.int4,
            calibration=request.calibration,
        )
        return pb.OptimizeVersionResponse(
            version=convert.version_out(done.version),
            size_before_bytes=done.size_before,
            size_after_bytes=done.size_after,
            rollout=convert.rollout_out(done.rollout),
        )

    # -- tenants (every call needs the admin token: the feed carries key hashes) ------------------
    async def CreateTenant(self, request: pb.CreateTenantRequest, context):
        self._admin(context)
        annotate(tenant=request.name)
        tenant, key = self.tenants.create(
            request.name,
            list(request.allowed_models),
            convert.quota_in(request.quota),
            convert.priority_in(request.priority),
            request.description,
            request.actor,
            request.reason,
        )
        return pb.TenantKey(tenant=convert.tenant_out(tenant), api_key=key)

    async def ListTenants(self, request: pb.ListTenantsRequest, context):
        self._admin(context)
        return pb.ListTenantsResponse(
            tenants=[convert.tenant_out(x) for x in self.tenants.list(request.include_revoked)]
        )

    async def RotateTenantKey(self, request: pb.RotateTenantKeyRequest, context):
        self._admin(context)
        annotate(tenant=request.name)
        tenant, key = self.tenants.rotate_key(request.name, request.actor, request.reason)
        return pb.TenantKey(tenant=convert.tenant_out(tenant), api_key=key)

    async def RevokeTenant(self, request: pb.RevokeTenantRequest, context):
        self._admin(context)
        annotate(tenant=request.name)
        return convert.tenant_out(self.tenants.revoke(request.name, request.actor, request.reason))

    async def SetTenantQuota(self, request: pb.SetTenantQuotaRequest, context):
        self._admin(context)
        annotate(tenant=request.name)
        allowed = list(request.allowed_models) if request.set_allowed_models else None
        return convert.tenant_out(
            self.tenants.set_quota(
                request.name,
                convert.quota_in(request.quota),
                convert.priority_in(request.priority, None),
                allowed,
                request.actor,
                request.reason,
            )
        )

    async def WatchTenants(self, request: pb.WatchTenantsRequest, context):
        self._admin(context)
        async for snapshot in self.tenants.watch():
            yield convert.tenants_event_out(snapshot)

    async def ListAudit(self, request: pb.ListAuditRequest, context):
        self._admin(context)
        return pb.ListAuditResponse(
            entries=[convert.audit_out(e) for e in self.tenants.audit(request.limit, request.target_prefix)]
        )
