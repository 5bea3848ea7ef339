{{/*
Shared pieces. Component helpers take (dict "root" $ "name" "<component>");
component values are (index .root.Values .name).
*/}}

{{- define "maas-mesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-maas-mesh; peers are addressed as <fullname>-<component>. */}}
{{- define "maas-mesh.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "maas-mesh.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Shorten the prefix, not the component, so names stay distinct within 63 chars ("-triton-headless" is 16). */}}
{{- define "maas-mesh.componentName" -}}
{{- printf "%s-%s" (include "maas-mesh.fullname" .root | trunc 47 | trimSuffix "-") .name -}}
{{- end -}}

{{- define "maas-mesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "maas-mesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "maas-mesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "maas-mesh.labels" -}}
{{ include "maas-mesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: maas-mesh
helm.sh/chart: {{ include "maas-mesh.chart" .root }}
{{- end -}}

{{/* Matches every pod of this release (NetworkPolicy peers). */}}
{{- define "maas-mesh.releasePodSelector" -}}
matchLabels:
  app.kubernetes.io/name: {{ include "maas-mesh.name" . }}
  app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* NetworkPolicy peer: any pod of this release (e.g. a `maas` CLI Job). */}}
{{- define "maas-mesh.releasePeer" -}}
- podSelector:
    {{- include "maas-mesh.releasePodSelector" . | nindent 4 }}
{{- end -}}

{{/* Listen port of each MaaS service (docs/development.md defaults; openai is HTTP, the others gRPC). */}}
{{- define "maas-mesh.port" -}}
{{- get (dict "router" 50051 "registry" 50052 "tokenizer" 50053 "vision" 50054 "triton" 8001 "openai" 8090 "console" 8091) .name -}}
{{- end -}}

{{/* host:port of a peer's Service. */}}
{{- define "maas-mesh.address" -}}
{{- printf "%s:%s" (include "maas-mesh.componentName" .) (include "maas-mesh.port" .) -}}
{{- end -}}

{{- define "maas-mesh.image" -}}
{{- $c := index .root.Values .name -}}
{{- $repo := $c.image.repository | default .root.Values.image.repository -}}
{{- $tag := $c.image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{- define "maas-mesh.imagePullPolicy" -}}
{{- $c := index .root.Values .name -}}
{{- $c.image.pullPolicy | default .root.Values.image.pullPolicy -}}
{{- end -}}

{{- define "maas-mesh.serviceAccountName" -}}
{{- if .root.Values.serviceAccount.create -}}
{{- include "maas-mesh.componentName" . -}}
{{- else -}}
default
{{- end -}}
{{- end -}}

{{/* Kubelet must let in-flight RPCs drain before SIGKILL. */}}
{{- define "maas-mesh.terminationGracePeriodSeconds" -}}
{{- $c := index .root.Values .name -}}
{{- $drain := int $c.drainGraceSeconds -}}
{{- if kindIs "invalid" $c.terminationGracePeriodSeconds -}}
{{- add $drain 10 -}}
{{- else if le (int $c.terminationGracePeriodSeconds) $drain -}}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must be greater than %s.drainGraceSeconds (%d)" .name (int $c.terminationGracePeriodSeconds) .name $drain) -}}
{{- else -}}
{{- int $c.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/*
Pod-level settings shared by every workload: identity, security, scheduling.
Pass "uid" (10001 for our image, 1000 for Triton's triton-server user) and
"apiAccess" (true only for pods that watch EndpointSlices).
*/}}
{{- define "maas-mesh.podSpecCommon" -}}
{{- $c := index .root.Values .name -}}
serviceAccountName: {{ include "maas-mesh.serviceAccountName" . }}
{{- /* The API token only where discovery watches EndpointSlices. */}}
automountServiceAccountToken: {{ and (.apiAccess | default false) (not (include "maas-mesh.tritonDiscoveryStatic" .root)) }}
terminationGracePeriodSeconds: {{ include "maas-mesh.terminationGracePeriodSeconds" . }}
{{ include "maas-mesh.podSecurityContext" .uid }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .nodeSelector | default $c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations | default $c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod security context for a non-root uid (also the group and volume owner). */}}
{{- define "maas-mesh.podSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ . }}
  runAsGroup: {{ . }}
  fsGroup: {{ . }}
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "maas-mesh.containerSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* Pod metadata: labels, scrape annotations (pass "metricsPort"), user annotations. */}}
{{- define "maas-mesh.podMetadata" -}}
{{- $c := index .root.Values .name -}}
labels:
  {{- include "maas-mesh.labels" . | nindent 2 }}
{{- $ann := dict -}}
{{- if .root.Values.metrics.scrapeAnnotations -}}
{{- $ann = dict "prometheus.io/scrape" "true" "prometheus.io/port" (toString .metricsPort) "prometheus.io/path" "/metrics" -}}
{{- end -}}
{{- $ann = merge (deepCopy ($c.podAnnotations | default dict)) $ann }}
{{- with $ann }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Native gRPC health probes (grpc.health.v1) for our services; with TLS on the plaintext health port.
Startup and liveness ask "" (the process serves); readiness asks "readiness": SERVING only while the
service reaches what it needs (the router and the registry: a Triton replica). A wrong Triton address
thus keeps the pod unready, with "not ready: Triton at ... unreachable: ..." in its log, instead of
restarting it. */}}
{{- define "maas-mesh.grpcProbes" -}}
startupProbe:
  grpc:
    port: {{ include "maas-mesh.probePort" . }}
  periodSeconds: 2
  failureThreshold: 30
readinessProbe:
  grpc:
    port: {{ include "maas-mesh.probePort" . }}
    service: readiness
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  grpc:
    port: {{ include "maas-mesh.probePort" . }}
  periodSeconds: 10
  failureThreshold: 3
{{- end -}}

{{/* Env every MaaS service reads, plus MAAS_<PEER>_ADDRESS for each of "peers". */}}
{{- define "maas-mesh.commonEnv" -}}
{{- $c := index .root.Values .name -}}
- name: MAAS_LISTEN
  value: "0.0.0.0:{{ include "maas-mesh.port" . }}"
- name: MAAS_METRICS_PORT
  value: "9090"
- name: MAAS_DRAIN_GRACE_SECONDS
  value: {{ $c.drainGraceSeconds | quote }}
- name: MAAS_MAX_MESSAGE_BYTES
  value: {{ .root.Values.maxMessageBytes | int64 | quote }}
- name: MAAS_LOG_LEVEL
  value: {{ .root.Values.logLevel | quote }}
- name: MAAS_LOG_FORMAT
  value: {{ .root.Values.logFormat | quote }}
{{- /* The CPU limit, not the node's CPU count that os.cpu_count() sees. */}}
- name: MAAS_WORKERS
  valueFrom:
    resourceFieldRef:
      containerName: {{ .name }}
      resource: limits.cpu
      divisor: "1"
{{- if .root.Values.otelCollector.enabled }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: "http://{{ include "maas-mesh.componentName" (dict "root" .root "name" "otel-collector") }}:4317"
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: grpc
- name: OTEL_TRACES_EXPORTER
  value: otlp
- name: OTEL_SERVICE_NAME
  value: "maas-{{ .name }}"
{{- end }}
{{- include "maas-mesh.tlsEnv" . }}
{{- range .peers }}
- name: MAAS_{{ upper . }}_ADDRESS
  {{- if and (eq . "triton") (eq $.root.Values.triton.discovery.mode "static") $.root.Values.triton.discovery.addresses }}
  value: {{ join "," $.root.Values.triton.discovery.addresses | quote }}
  {{- else }}
  value: {{ include "maas-mesh.address" (dict "root" $.root "name" .) | quote }}
  {{- end }}
{{- end }}
{{- end -}}

{{/*
How router and registry find every Triton replica (triton.discovery). endpointslices: they watch the
headless Service through the Kubernetes API. static: MAAS_TRITON_ADDRESS (triton.discovery.addresses,
default the Triton Service) is the replica list, no API access (no token is mounted).
*/}}
{{- define "maas-mesh.tritonDiscoveryStatic" -}}
{{- if eq .Values.triton.discovery.mode "static" -}}
{{- if and (not .Values.triton.discovery.addresses) (or .Values.triton.autoscaling.enabled (gt (int .Values.triton.replicas) 1)) -}}
{{- fail "triton.discovery.mode=static without triton.discovery.addresses reaches one Triton replica (through its Service), but the registry must load models on every replica: list each replica's host:port in triton.discovery.addresses, or run one replica (triton.replicas=1, triton.autoscaling.enabled=false)" -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{- define "maas-mesh.tritonDiscoveryEnv" -}}
- name: MAAS_TRITON_DISCOVERY
  value: {{ .Values.triton.discovery.mode }}
{{- if ne .Values.triton.discovery.mode "static" }}
- name: MAAS_TRITON_SERVICE
  value: {{ include "maas-mesh.componentName" (dict "root" . "name" "triton-headless") }}
{{- end }}
{{- end -}}

{{/*
Deployment of one of the four MaaS services (one image, command maas-<name>).
Besides root/name, callers pass:
  peers       components whose MAAS_<PEER>_ADDRESS to set
  apiAccess   true for EndpointSlice watchers: mounts the API token and sets
              MAAS_TRITON_DISCOVERY/MAAS_TRITON_SERVICE (every Triton replica)
  writable    true to mount the model repository read-write (registry only)
  strategy    Deployment strategy (dict); default rolling with no unavailable pod
  extraPorts, extraEnv, extraMounts, extraVolumes   YAML strings
Every service gets the model repository (MAAS_MODEL_REPOSITORY): tokenizer.json,
preprocess.json and labels live next to the models.
*/}}
{{- define "maas-mesh.serviceDeployment" -}}
{{- $c := index .root.Values .name -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "maas-mesh.componentName" . }}
  labels:
    {{- include "maas-mesh.labels" . | nindent 4 }}
spec:
  {{- if not $c.autoscaling.enabled }}
  replicas: {{ $c.replicas }}
  {{- end }}
  strategy:
    {{- toYaml (.strategy | default (dict "type" "RollingUpdate" "rollingUpdate" (dict "maxSurge" "25%" "maxUnavailable" 0))) | nindent 4 }}
  selector:
    matchLabels:
      {{- include "maas-mesh.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      {{- include "maas-mesh.podMetadata" (merge (dict "metricsPort" 9090) .) | nindent 6 }}
    spec:
      {{- include "maas-mesh.podSpecCommon" (merge (dict "uid" 10001) .) | nindent 6 }}
      containers:
        - name: {{ .name }}
          image: {{ include "maas-mesh.image" . | quote }}
          imagePullPolicy: {{ include "maas-mesh.imagePullPolicy" . }}
          command: ["maas-{{ .name }}"]
          ports:
            - {name: grpc, containerPort: {{ include "maas-mesh.port" . }}, protocol: TCP}
            - {name: metrics, containerPort: 9090, protocol: TCP}
            {{- if .root.Values.tls.enabled }}
            - {name: health, containerPort: {{ .root.Values.tls.healthPort }}, protocol: TCP}
            {{- end }}
            {{- with .extraPorts }}
            {{- . | nindent 12 }}
            {{- end }}
          env:
            {{- include "maas-mesh.commonEnv" . | nindent 12 }}
            - name: MAAS_MODEL_REPOSITORY
              value: {{ include "maas-mesh.modelRepositoryLocation" .root | quote }}
            {{- if .apiAccess }}
            {{- include "maas-mesh.tritonDiscoveryEnv" .root | nindent 12 }}
            {{- end }}
            {{- with .extraEnv }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- with $c.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- with include "maas-mesh.modelRepositoryEnvFrom" .root }}
          {{- . | nindent 10 }}
          {{- end }}
          {{- include "maas-mesh.grpcProbes" . | nindent 10 }}
          {{- include "maas-mesh.containerSecurityContext" . | nindent 10 }}
          {{- with $c.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          volumeMounts:
            {{- /* readOnlyRootFilesystem: /tmp is the only scratch space. */}}
            - {name: tmp, mountPath: /tmp}
            {{- include "maas-mesh.modelRepositoryMounts" (dict "root" .root "readOnly" (not .writable)) | nindent 12 }}
            {{- include "maas-mesh.tlsMounts" .root | nindent 12 }}
            {{- with .extraMounts }}
            {{- . | nindent 12 }}
            {{- end }}
      volumes:
        - {name: tmp, emptyDir: {}}
        {{- include "maas-mesh.modelRepositoryVolumes" (dict "root" .root "readOnly" (not .writable)) | nindent 8 }}
        {{- include "maas-mesh.tlsVolumes" .root | nindent 8 }}
        {{- with .extraVolumes }}
        {{- . | nindent 8 }}
        {{- end }}
{{- end -}}

{{/* gRPC + metrics Service for a MaaS service; "extraPorts" (YAML string) adds ServicePorts. */}}
{{- define "maas-mesh.service" -}}
{{- $c := index .root.Values .name -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "maas-mesh.componentName" . }}
  labels:
    {{- include "maas-mesh.labels" . | nindent 4 }}
    maas-mesh.io/scrape: "true"
  {{- with $c.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ $c.service.type }}
  selector:
    {{- include "maas-mesh.selectorLabels" . | nindent 4 }}
  ports:
    - {name: grpc, port: {{ include "maas-mesh.port" . }}, targetPort: grpc, protocol: TCP, appProtocol: grpc}
    - {name: metrics, port: 9090, targetPort: metrics, protocol: TCP}
    {{- with .extraPorts }}
    {{- . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* The lower bound of replicas the component will run with. */}}
{{- define "maas-mesh.minReplicas" -}}
{{- $c := index .root.Values .name -}}
{{- if $c.autoscaling.enabled -}}{{ $c.autoscaling.minReplicas }}{{- else -}}{{ $c.replicas }}{{- end -}}
{{- end -}}

{{/* HPA (autoscaling/v2), or a KEDA ScaledObject when keda.enabled. */}}
{{- define "maas-mesh.autoscaler" -}}
{{- $c := index .root.Values .name -}}
{{- $a := $c.autoscaling -}}
{{- if $a.enabled -}}
{{- if and (kindIs "invalid" $a.targetCPUUtilizationPercentage) (not $a.podsMetric) -}}
{{- fail (printf "%s.autoscaling needs targetCPUUtilizationPercentage or podsMetric" .name) -}}
{{- end -}}
{{- if .root.Values.keda.enabled }}
---
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ include "maas-mesh.componentName" . }}
  labels:
    {{- include "maas-mesh.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    name: {{ include "maas-mesh.componentName" . }}
  minReplicaCount: {{ $a.minReplicas }}
  maxReplicaCount: {{ $a.maxReplicas }}
  pollingInterval: {{ .root.Values.keda.pollingInterval }}
  cooldownPeriod: {{ .root.Values.keda.cooldownPeriod }}
  {{- with $a.behavior }}
  advanced:
    horizontalPodAutoscalerConfig:
      behavior:
        {{- toYaml . | nindent 8 }}
  {{- end }}
  triggers:
    {{- if not (kindIs "invalid" $a.targetCPUUtilizationPercentage) }}
    - type: cpu
      metricType: Utilization
      metadata:
        value: {{ $a.targetCPUUtilizationPercentage | quote }}
    {{- end }}
    {{- with $a.podsMetric }}
    - type: prometheus
      metricType: AverageValue
      metadata:
        serverAddress: {{ $.root.Values.keda.prometheusServerAddress | quote }}
        query: {{ tpl .kedaQuery $.root | quote }}
        threshold: {{ .targetAverageValue | quote }}
    {{- end }}
{{- else }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "maas-mesh.componentName" . }}
  labels:
    {{- include "maas-mesh.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "maas-mesh.componentName" . }}
  minReplicas: {{ $a.minReplicas }}
  maxReplicas: {{ $a.maxReplicas }}
  metrics:
    {{- if not (kindIs "invalid" $a.targetCPUUtilizationPercentage) }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $a.targetCPUUtilizationPercentage }}
    {{- end }}
    {{- with $a.podsMetric }}
    - type: Pods
      pods:
        metric:
          name: {{ .name }}
        target:
          type: AverageValue
          averageValue: {{ .targetAverageValue | quote }}
    {{- end }}
  {{- with $a.behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* PDB only where more than one replica runs. */}}
{{- define "maas-mesh.pdb" -}}
{{- $c := index .root.Values .name -}}
{{- if and $c.pdb.enabled (gt (int (include "maas-mesh.minReplicas" .)) 1) }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "maas-mesh.componentName" . }}
  labels:
    {{- include "maas-mesh.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ $c.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "maas-mesh.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end -}}

{{/* Model repository as Triton sees it: a mount path or the bucket URL. */}}
{{- define "maas-mesh.modelRepositoryLocation" -}}
{{- $m := .Values.modelRepository -}}
{{- if eq $m.type "objectStore" -}}
{{- required "modelRepository.objectStore.url is required when modelRepository.type=objectStore" $m.objectStore.url -}}
{{- else -}}
{{- $m.mountPath -}}
{{- end -}}
{{- end -}}

{{- define "maas-mesh.modelRepositoryClaim" -}}
{{- .Values.modelRepository.pvc.existingClaim | default (printf "%s-models" (include "maas-mesh.fullname" .)) -}}
{{- end -}}

{{/* Volumes + mounts giving a pod the model repository (readOnly for Triton). */}}
{{- define "maas-mesh.modelRepositoryVolumes" -}}
{{- $m := .root.Values.modelRepository -}}
{{- if eq $m.type "objectStore" -}}
- name: object-store-credentials
  secret:
    secretName: {{ required "modelRepository.objectStore.credentialsSecret is required when modelRepository.type=objectStore" $m.objectStore.credentialsSecret }}
{{- else -}}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "maas-mesh.modelRepositoryClaim" .root }}
    readOnly: {{ .readOnly }}
{{- end -}}
{{- end -}}

{{- define "maas-mesh.modelRepositoryMounts" -}}
{{- $m := .root.Values.modelRepository -}}
{{- if eq $m.type "objectStore" -}}
- {name: object-store-credentials, mountPath: /etc/maas/object-store, readOnly: true}
{{- else -}}
- {name: models, mountPath: {{ $m.mountPath }}, readOnly: {{ .readOnly }}}
{{- end -}}
{{- end -}}

{{/* MAAS_ADMIN_TOKEN from that Secret: the registry checks it; the router sends it (tenant list, shadow
and per-version reports, which the registry refuses without it). */}}
{{- define "maas-mesh.adminTokenEnv" -}}
{{- $t := .Values.registry.adminToken -}}
- name: MAAS_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "maas-mesh.registry.tokenSecret" . }}
      key: {{ ternary $t.existingSecretKey "token" (ne $t.existingSecret "") }}
{{- end -}}

{{/*
The router's API keys and priority shedding (values auth, docs/security.md). Sheddable calls are refused
first: a standard threshold needs a sheddable one at or below it.
*/}}
{{- define "maas-mesh.router.authEnv" -}}
{{- $a := .Values.auth -}}
{{- range $signal, $values := dict "inflight" $a.shedding.inflight "queueMs" $a.shedding.queueMs -}}
{{- if and $values.standard (or (not $values.sheddable) (gt (float64 $values.sheddable) (float64 $values.standard))) -}}
{{- fail (printf "auth.shedding.%s.standard (%v) needs auth.shedding.%s.sheddable set at or below it: sheddable calls are refused first" $signal $values.standard $signal $values.sheddable) -}}
{{- end -}}
{{- end -}}
- name: MAAS_ROUTER_AUTH
  value: {{ ternary "on" "off" $a.enabled | quote }}
- name: MAAS_ROUTER_SHED_SHEDDABLE_INFLIGHT
  value: {{ $a.shedding.inflight.sheddable | quote }}
- name: MAAS_ROUTER_SHED_STANDARD_INFLIGHT
  value: {{ $a.shedding.inflight.standard | quote }}
- name: MAAS_ROUTER_SHED_SHEDDABLE_QUEUE_MS
  value: {{ $a.shedding.queueMs.sheddable | quote }}
- name: MAAS_ROUTER_SHED_STANDARD_QUEUE_MS
  value: {{ $a.shedding.queueMs.standard | quote }}
- name: MAAS_ROUTER_QUEUE_SAMPLE_INTERVAL_SECONDS
  value: {{ $a.shedding.queueSampleIntervalSeconds | quote }}
- name: MAAS_ROUTER_SHED_RETRY_AFTER_SECONDS
  value: {{ $a.shedding.retryAfterSeconds | quote }}
{{ include "maas-mesh.adminTokenEnv" . }}
{{- end -}}

{{/* Secret holding MAAS_ADMIN_TOKEN: the user's, or the one the chart generates. */}}
{{- define "maas-mesh.registry.tokenSecret" -}}
{{- .Values.registry.adminToken.existingSecret | default (printf "%s-admin-token" (include "maas-mesh.componentName" (dict "root" . "name" "registry"))) -}}
{{- end -}}

{{/* Object-store credentials as env (AWS_*, AZURE_*, GOOGLE_APPLICATION_CREDENTIALS). */}}
{{- define "maas-mesh.modelRepositoryEnvFrom" -}}
{{- $m := .Values.modelRepository -}}
{{- if eq $m.type "objectStore" -}}
envFrom:
  - secretRef:
      name: {{ $m.objectStore.credentialsSecret }}
{{- end -}}
{{- end -}}

{{/* NetworkPolicy ingress rule for metrics from the monitoring namespace. */}}
{{- define "maas-mesh.metricsIngress" -}}
- from:
    - namespaceSelector:
        {{- toYaml .root.Values.networkPolicy.monitoringNamespaceSelector | nindent 8 }}
    {{- with .extraFrom }}
    {{- . | nindent 4 }}
    {{- end }}
  ports:
    - {port: {{ .metricsPort }}, protocol: TCP}
{{- end -}}

{{/* Peer: pods of one component of this release. */}}
{{- define "maas-mesh.componentPeer" -}}
- podSelector:
    matchLabels:
      {{- include "maas-mesh.selectorLabels" . | nindent 6 }}
{{- end -}}

{{/*
Router's OIP fast path (compiled) (maas-oip-fastpath, a child process of the
router): inference.GRPCInferenceService on its own port, beside the router's main gRPC port.
Takes the root context.
*/}}
{{- define "maas-mesh.router.oipFastPort" -}}
{{- int .Values.router.oipFastPath.port -}}
{{- end -}}

{{/* "true" when the router runs its OIP fast path: router.oipFastPath.enabled (with auth.enabled it checks
API keys like the main port: docs/security.md). */}}
{{- define "maas-mesh.router.oipFastOn" -}}
{{- if .Values.router.oipFastPath.enabled -}}true{{- end -}}
{{- end -}}

{{/* MAAS_ROUTER_OIP_FAST_LISTEN: 0.0.0.0:<port>, or "off" so the router starts no fast path. */}}
{{- define "maas-mesh.router.oipFastEnv" -}}
- name: MAAS_ROUTER_OIP_FAST_LISTEN
  {{- if include "maas-mesh.router.oipFastOn" . }}
  value: "0.0.0.0:{{ include "maas-mesh.router.oipFastPort" . }}"
  {{- else }}
  value: "off"
  {{- end }}
{{- end -}}

{{- define "maas-mesh.router.oipFastContainerPort" -}}
{{- if include "maas-mesh.router.oipFastOn" . -}}
- {name: oip-fast, containerPort: {{ include "maas-mesh.router.oipFastPort" . }}, protocol: TCP}
{{- end -}}
{{- end -}}

{{- define "maas-mesh.router.oipFastServicePort" -}}
{{- if include "maas-mesh.router.oipFastOn" . -}}
- {name: oip-fast, port: {{ include "maas-mesh.router.oipFastPort" . }}, targetPort: oip-fast, protocol: TCP, appProtocol: grpc}
{{- end -}}
{{- end -}}

{{/*
TLS (values tls): one certificate for the release, naming every component's Service, mounted at
/etc/maas/tls in every pod (tls.crt, tls.key, ca.crt: cert-manager's Secret layout). Services re-read
the files when kubelet updates the Secret (rotation without restart; Triton reads them at start).
*/}}
{{- define "maas-mesh.tls.secretName" -}}
{{- if .Values.tls.existingSecret -}}
{{- .Values.tls.existingSecret -}}
{{- else -}}
{{- include "maas-mesh.componentName" (dict "root" . "name" "tls") -}}
{{- end -}}
{{- end -}}

{{- define "maas-mesh.tls.dir" -}}/etc/maas/tls{{- end -}}

{{/* Names every component's certificate check accepts (its Service, headless Triton, loopback). */}}
{{- define "maas-mesh.tls.dnsNames" -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list (include "maas-mesh.fullname" .) "localhost" -}}
{{- range list "router" "registry" "tokenizer" "vision" "openai" "console" "triton" "triton-headless" -}}
{{- $svc := include "maas-mesh.componentName" (dict "root" $ "name" .) -}}
{{- $names = concat $names (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns)) -}}
{{- end -}}
{{- toYaml $names -}}
{{- end -}}

{{/* MAAS_TLS_* of one component (pass root/name); the router's callers per tls.clientAuth; the HTTPS
services (openai, console) ask no client certificate. */}}
{{- define "maas-mesh.tlsEnv" -}}
{{- if .root.Values.tls.enabled }}
{{- $dir := include "maas-mesh.tls.dir" .root }}
- name: MAAS_TLS_CERT
  value: {{ $dir }}/tls.crt
- name: MAAS_TLS_KEY
  value: {{ $dir }}/tls.key
- name: MAAS_TLS_CA
  value: {{ $dir }}/ca.crt
- name: MAAS_TLS_CLIENT_AUTH
  value: {{ if eq .name "router" }}{{ .root.Values.tls.clientAuth }}{{ else if has .name (list "openai" "console") }}optional{{ else }}required{{ end }}
{{- /* Peers reached by pod IP (Triton replicas, address lists) are checked against the release's name. */}}
- name: MAAS_TLS_SERVER_NAME
  value: {{ include "maas-mesh.fullname" .root | quote }}
{{- if not (has .name (list "openai" "console")) }}
{{- /* kubelet's gRPC probes speak no TLS: grpc.health.v1 alone, plaintext, on its own port. */}}
- name: MAAS_HEALTH_LISTEN
  value: "0.0.0.0:{{ .root.Values.tls.healthPort }}"
{{- end }}
{{- end }}
{{- end -}}

{{- define "maas-mesh.tlsMounts" -}}
{{- if .Values.tls.enabled }}
- {name: tls, mountPath: {{ include "maas-mesh.tls.dir" . }}, readOnly: true}
{{- end }}
{{- end -}}

{{- define "maas-mesh.tlsVolumes" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "maas-mesh.tls.secretName" . }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{/* The port kubelet probes: the plaintext health-only port with TLS, else the service's own. */}}
{{- define "maas-mesh.probePort" -}}
{{- if .root.Values.tls.enabled -}}
{{- .root.Values.tls.healthPort -}}
{{- else -}}
{{- include "maas-mesh.port" . -}}
{{- end -}}
{{- end -}}
