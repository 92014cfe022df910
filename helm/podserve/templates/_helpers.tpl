{{/* Chart name, overridable. */}}
{{- define "podserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release name, plus the chart name unless the release already contains it. */}}
{{- define "podserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "podserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels shared by every object; "component" is added per object. */}}
{{- define "podserve.labels" -}}
helm.sh/chart: {{ include "podserve.chart" . }}
app.kubernetes.io/name: {{ include "podserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: podserve
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "server"). */}}
{{- define "podserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "podserve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's objects. */}}
{{- define "podserve.componentLabels" -}}
{{ include "podserve.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "podserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "podserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Server image: repository:tag, or repository@digest when a digest is given. */}}
{{- define "podserve.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* A third-party image: call with its image values. */}}
{{- define "podserve.extImage" -}}
{{- printf "%s:%s" .repository .tag }}
{{- end }}

{{/*
Gunicorn workers = ceil(CPU limit), computed here because a container cannot read its quota
reliably on both cgroup v1 and v2. Accepts "2", 2, 1.5, "1500m".
*/}}
{{- define "podserve.workers" -}}
{{- $cpu := toString .Values.resources.limits.cpu }}
{{- $workers := 0 }}
{{- if hasSuffix "m" $cpu }}
{{- $workers = div (add (atoi (trimSuffix "m" $cpu)) 999) 1000 }}
{{- else }}
{{- $workers = int (ceil (float64 $cpu)) }}
{{- end }}
{{- max 1 $workers }}
{{- end }}

{{/* Memory for requests/limits when not given: base + workers x per-worker. */}}
{{- define "podserve.memory" -}}
{{- $workers := int (include "podserve.workers" .) }}
{{- printf "%dMi" (add .Values.memorySizing.baseMi (mul $workers .Values.memorySizing.perWorkerMi)) }}
{{- end }}

{{/* Resources of the server container with memory filled in. */}}
{{- define "podserve.resources" -}}
{{- $mem := include "podserve.memory" . -}}
requests:
  cpu: {{ .Values.resources.requests.cpu | quote }}
  memory: {{ default $mem .Values.resources.requests.memory | quote }}
limits:
  cpu: {{ .Values.resources.limits.cpu | quote }}
  memory: {{ default $mem .Values.resources.limits.memory | quote }}
{{- end }}

{{- define "podserve.terminationGracePeriodSeconds" -}}
{{- add (int .Values.preStopSleepSeconds) (int (ceil .Values.server.gracefulTimeoutSeconds)) (int .Values.terminationGraceMarginSeconds) }}
{{- end }}

{{/* Pod-level security context shared by every pod of the chart. */}}
{{- define "podserve.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security context shared by every container of the chart. */}}
{{- define "podserve.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* In-cluster URL of the podserve Service. */}}
{{- define "podserve.serviceUrl" -}}
{{- printf "http://%s:%v" (include "podserve.fullname" .) .Values.service.port }}
{{- end }}

{{/* OTLP/HTTP endpoint: explicit, else the bundled collector, else the bundled Jaeger. */}}
{{- define "podserve.otlpEndpoint" -}}
{{- if .Values.tracing.endpoint }}
{{- .Values.tracing.endpoint }}
{{- else if .Values.otelCollector.enabled }}
{{- printf "http://%s-otel-collector:4318" (include "podserve.fullname" .) }}
{{- else if .Values.jaeger.enabled }}
{{- printf "http://%s-jaeger:4318" (include "podserve.fullname" .) }}
{{- end }}
{{- end }}

{{/* The per-pod metric the custom-metric autoscaling uses. */}}
{{- define "podserve.customMetricName" -}}
{{- if eq .Values.autoscaling.customMetric.type "queue" }}podserve_queue_rows{{ else }}podserve_inflight_requests{{ end }}
{{- end }}

{{- define "podserve.customMetricTarget" -}}
{{- if eq .Values.autoscaling.customMetric.type "queue" }}{{ .Values.autoscaling.customMetric.queueTarget }}{{ else }}{{ .Values.autoscaling.customMetric.inflightTarget }}{{ end }}
{{- end }}

{{/* Cross-field checks the JSON schema cannot express clearly. */}}
{{- define "podserve.validate" -}}
{{- if and .Values.database.enabled (not .Values.database.existingSecret) }}
{{- fail "database.enabled requires database.existingSecret (a Secret holding the database URL)" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not (or .Values.autoscaling.cpu.enabled .Values.autoscaling.customMetric.enabled)) }}
{{- fail "autoscaling.enabled needs autoscaling.cpu.enabled or autoscaling.customMetric.enabled" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.autoscaling.customMetric.enabled (not .Values.metrics.enabled) }}
{{- fail "autoscaling.customMetric.enabled needs metrics.enabled" }}
{{- end }}
{{- /* the worker's drain: ceil(gracefulTimeoutSeconds) - 2, at least 1 (settings.worker_drain_s) */}}
{{- if ge (float64 .Values.server.drainIdleGraceSeconds) (maxf 1 (subf (ceil .Values.server.gracefulTimeoutSeconds) 2)) }}
{{- fail "server.drainIdleGraceSeconds must be shorter than the drain: server.gracefulTimeoutSeconds - 2" }}
{{- end }}
{{- end }}
