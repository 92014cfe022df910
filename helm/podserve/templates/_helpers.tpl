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

{{/*
Server image tag: image.tag, else the chart's appVersion. `--set image.tag=1234567` (a short
commit hash of digits, as skaffold passes it) arrives as a number.
*/}}
{{- define "podserve.imageTag" -}}
{{- if kindIs "string" .Values.image.tag }}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- else }}
{{- .Values.image.tag | int64 }}
{{- end }}
{{- end }}

{{/* Server image: repository:tag, or repository@digest when a digest is given. */}}
{{- define "podserve.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "podserve.imageTag" .) }}
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

{{/* Millicores of a CPU quantity (2, "1.5", "1500m"). */}}
{{- define "podserve.cpuUnits" -}}
{{- $cpu := toString . }}
{{- if hasSuffix "m" $cpu }}{{ trimSuffix "m" $cpu }}{{ else }}{{ mulf $cpu 1000 }}{{ end }}
{{- end }}

{{/* Bytes of a memory quantity, in every unit the schema allows ("512Mi", "1.5Gi", "1G", "1000"). */}}
{{- define "podserve.memoryUnits" -}}
{{- $unit := regexFind "[A-Za-z]+$" . }}
{{- $bytes := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 }}
{{- mulf (trimSuffix $unit .) (get $bytes $unit) }}
{{- end }}

{{/* "true" when quantity a is above quantity b: call with (list "cpu"|"memory" a b). */}}
{{- define "podserve.exceeds" -}}
{{- $units := printf "podserve.%sUnits" (index . 0) }}
{{- if gt (float64 (include $units (index . 1))) (float64 (include $units (index . 2))) }}true{{ end }}
{{- end }}

{{/*
Resources of the server container. An empty CPU request is the limit (Guaranteed QoS); empty
memory is memorySizing's, yet never a request above the limit or a limit below the request that
the user set: the API server rejects a request above its limit.
*/}}
{{- define "podserve.resources" -}}
{{- $res := .Values.resources }}
{{- $mem := include "podserve.memory" . }}
{{- $limitMem := $res.limits.memory }}
{{- if not $limitMem }}
{{- $limitMem = $mem }}
{{- if and $res.requests.memory (include "podserve.exceeds" (list "memory" $res.requests.memory $mem)) }}
{{- $limitMem = $res.requests.memory }}
{{- end }}
{{- end }}
{{- $requestMem := $res.requests.memory }}
{{- if not $requestMem }}
{{- $requestMem = $mem }}
{{- if include "podserve.exceeds" (list "memory" $mem $limitMem) }}
{{- $requestMem = $limitMem }}
{{- end }}
{{- end -}}
requests:
  cpu: {{ default $res.limits.cpu $res.requests.cpu | quote }}
  memory: {{ $requestMem | quote }}
limits:
  cpu: {{ $res.limits.cpu | quote }}
  memory: {{ $limitMem | quote }}
{{- end }}

{{/*
A number in plain decimal (2, 0.5, "25%" as is). Values files give float64, which templates
print as "1e+06": the server's integer settings and Kubernetes' integer fields reject that.
Integer-only values use `| int64` instead.
*/}}
{{- define "podserve.number" -}}
{{- if and (not (kindIs "string" .)) (eq (float64 .) (floor .)) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- end }}

{{- /* `--set` passes a fraction (1.5) as the string "1.5": the schema checks its form and the
number's bounds, this the string's bounds. (list name value low lowIncluded high-or-nil) */}}
{{- define "podserve.decimalWithin" -}}
{{- $name := index . 0 }}{{- $value := index . 1 }}{{- $low := float64 (index . 2) }}
{{- $included := index . 3 }}{{- $high := index . 4 }}
{{- if kindIs "string" $value }}
{{- $v := float64 $value }}
{{- if or (lt $v $low) (and (not $included) (eq $v $low)) (and (not (kindIs "invalid" $high)) (gt $v (float64 $high))) }}
{{- $bound := printf "%s %v" (ternary "at least" "above" $included) (index . 2) }}
{{- if not (kindIs "invalid" $high) }}{{- $bound = printf "%s and at most %v" $bound $high }}{{- end }}
{{- fail (printf "%s must be %s, got %s" $name $bound $value) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "podserve.terminationGracePeriodSeconds" -}}
{{- add (int .Values.preStopSleepSeconds) (int (ceil .Values.server.gracefulTimeoutSeconds)) (int .Values.terminationGraceMarginSeconds) }}
{{- end }}

{{/* Pod-level security context shared by every pod of the chart. */}}
{{- define "podserve.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser | int64 }}
runAsGroup: {{ .Values.podSecurity.runAsGroup | int64 }}
fsGroup: {{ .Values.podSecurity.fsGroup | int64 }}
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
{{- printf "http://%s:%d" (include "podserve.fullname" .) (.Values.service.port | int64) }}
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

{{/*
RE2 that matches the server Deployment's pod names only: <fullname>-<pod-template-hash, 1 to 10
characters>-<5 random characters>, both from Kubernetes' vowel-free alphabet, where the API server
cuts what precedes the random part to 58 characters. A prefix match would also take the pods of
a Deployment "<fullname>-canary".
*/}}
{{- define "podserve.podNamePattern" -}}
{{- $c := "[bcdfghjklmnpqrstvwxz2456789]" }}
{{- $prefix := printf "%s-" (include "podserve.fullname" .) }}
{{- $room := sub 58 (len $prefix) }}
{{- if gt $room 10 }}
{{- printf "%s%s{1,10}-%s{5}" (regexQuoteMeta $prefix) $c $c }}
{{- else if gt $room 1 }}
{{- printf "%s(?:%s{1,%d}-|%s{%d})%s{5}" (regexQuoteMeta $prefix) $c (sub $room 1) $c $room $c }}
{{- else }}
{{- printf "%s%s{%d}" (regexQuoteMeta (trunc 58 $prefix)) $c (add 5 (max $room 0)) }}
{{- end }}
{{- end }}

{{/* The per-pod metric the custom-metric autoscaling uses. */}}
{{- define "podserve.customMetricName" -}}
{{- if eq .Values.autoscaling.customMetric.type "queue" }}podserve_queue_rows{{ else }}podserve_inflight_requests{{ end }}
{{- end }}

{{- define "podserve.customMetricTarget" -}}
{{- $metric := .Values.autoscaling.customMetric }}
{{- include "podserve.number" (ternary $metric.queueTarget $metric.inflightTarget (eq $metric.type "queue")) }}
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
{{- $res := .Values.resources }}
{{- if and $res.requests.cpu (include "podserve.exceeds" (list "cpu" $res.requests.cpu $res.limits.cpu)) }}
{{- fail (printf "resources.requests.cpu (%v) must not exceed resources.limits.cpu (%v): the API server rejects it" $res.requests.cpu $res.limits.cpu) }}
{{- end }}
{{- if and $res.requests.memory $res.limits.memory (include "podserve.exceeds" (list "memory" $res.requests.memory $res.limits.memory)) }}
{{- fail (printf "resources.requests.memory (%s) must not exceed resources.limits.memory (%s): the API server rejects it" $res.requests.memory $res.limits.memory) }}
{{- end }}
{{- if and .Values.autoscaling.customMetric.enabled (not .Values.metrics.enabled) }}
{{- fail "autoscaling.customMetric.enabled needs metrics.enabled" }}
{{- end }}
{{- $s := .Values.server }}{{- $rule := .Values.metrics.prometheusRule }}
{{- range (list
    (list "server.gracefulTimeoutSeconds" $s.gracefulTimeoutSeconds 1 false nil)
    (list "server.workerTimeoutSeconds" $s.workerTimeoutSeconds 0 false nil)
    (list "server.keepaliveSeconds" $s.keepaliveSeconds 0 false nil)
    (list "server.recycleMaxWaitSeconds" $s.recycleMaxWaitSeconds 1 true nil)
    (list "server.drainIdleGraceSeconds" $s.drainIdleGraceSeconds 0 true 10)
    (list "metrics.prometheusRule.serverErrorRatio" $rule.serverErrorRatio 0 false 1)
    (list "metrics.prometheusRule.shedRatio" $rule.shedRatio 0 false 1)
    (list "metrics.prometheusRule.latencyP99Seconds" $rule.latencyP99Seconds 0 false nil)
    (list "locust.spawnRate" .Values.locust.spawnRate 0 false nil)) }}
{{- include "podserve.decimalWithin" . }}
{{- end }}
{{- $replicas := ternary .Values.autoscaling.maxReplicas .Values.replicaCount .Values.autoscaling.enabled }}
{{- if and .Values.storage.spoolExistingClaim (not .Values.storage.spoolClaimShared) (gt (int $replicas) 1) }}
{{- fail (printf "storage.spoolExistingClaim is mounted by every pod (up to %v): it must be a ReadWriteMany volume; say so with storage.spoolClaimShared=true, or run one replica" $replicas) }}
{{- end }}
{{- if .Values.locust.enabled }}
{{- include "podserve.locustWeightsRun" .Values.locust.weights }}
{{- end }}
{{- /* the worker's drain: ceil(gracefulTimeoutSeconds) - 2, at least 1 (settings.worker_drain_s) */}}
{{- if ge (float64 .Values.server.drainIdleGraceSeconds) (maxf 1 (subf (ceil .Values.server.gracefulTimeoutSeconds) 2)) }}
{{- fail "server.drainIdleGraceSeconds must be shorter than the drain: server.gracefulTimeoutSeconds - 2" }}
{{- end }}
{{- end }}

{{/* Fails when locust.weights leaves every user class at 0 over the locustfile's defaults
(DEFAULT_WEIGHTS in files/locustfile.py): the schema checks each pair, not their sum, and
Locust itself would only log "No User class found!" in every worker's crash loop. */}}
{{- define "podserve.locustWeightsRun" -}}
{{- $weights := dict "tabular" 4 "v1" 1 "text" 2 "entity" 0 "jobs" 0 }}
{{- range (splitList "," .) }}
{{- $pair := splitList "=" (trim .) }}
{{- if eq (len $pair) 2 }}{{- $_ := set $weights (index $pair 0) (atoi (index $pair 1)) }}{{- end }}
{{- end }}
{{- $total := 0 }}
{{- range $name, $weight := $weights }}{{- $total = add $total $weight }}{{- end }}
{{- if eq (int $total) 0 }}
{{- fail (printf "locust.weights %q leaves every user class at weight 0 (unset classes keep their defaults: tabular=4, v1=1, text=2): nothing would run" .) }}
{{- end }}
{{- end }}
