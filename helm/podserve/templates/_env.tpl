{{/* Downward API: who and where this pod is (used in trace resource attributes and logs). */}}
{{- define "podserve.downwardEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
{{- end }}

{{- define "podserve.databaseEnv" -}}
{{- if .Values.database.enabled -}}
- name: PODSERVE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.secretKey }}
{{- end }}
{{- end }}

{{/*
Env of the server container. Settings that must agree with the pod spec (workers vs CPU limit,
graceful timeout vs grace period, paths vs mounts) are set here, not in the ConfigMap.
*/}}
{{- define "podserve.serverEnv" -}}
{{ include "podserve.downwardEnv" . }}
- name: PODSERVE_HOST
  value: {{ .Values.server.host | quote }}
- name: PODSERVE_PORT
  value: {{ .Values.server.port | int64 | quote }}
# ceil(limits.cpu): one Gunicorn worker per CPU of quota.
- name: PODSERVE_WORKERS
  value: {{ include "podserve.workers" . | quote }}
- name: PODSERVE_GRACEFUL_TIMEOUT_S
  value: {{ include "podserve.number" .Values.server.gracefulTimeoutSeconds | quote }}
- name: PODSERVE_POOL_THREADS
  value: {{ .Values.inference.poolThreads | int64 | quote }}
- name: PODSERVE_ORT_INTRA_OP_THREADS
  value: {{ .Values.inference.ortIntraOpThreads | int64 | quote }}
- name: PODSERVE_MODEL_REPOSITORY
  value: {{ .Values.modelRepository.path | quote }}
- name: PODSERVE_SPOOL_DIR
  value: {{ .Values.storage.spoolPath | quote }}
- name: PODSERVE_PROMETHEUS_MULTIPROC_DIR
  value: {{ .Values.storage.metricsPath | quote }}
# prometheus_client reads this name itself.
- name: PROMETHEUS_MULTIPROC_DIR
  value: {{ .Values.storage.metricsPath | quote }}
- name: PODSERVE_METRICS_ENABLED
  value: {{ .Values.metrics.enabled | quote }}
{{- if .Values.database.enabled }}
{{ include "podserve.databaseEnv" . }}
{{- end }}
{{- if .Values.auth.existingSecret }}
- name: PODSERVE_API_KEYS_FILE
  value: {{ printf "%s/%s" .Values.auth.mountPath .Values.auth.secretKey | quote }}
{{- end }}
{{ include "podserve.otelEnv" . }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* OTEL_* env; resource attributes reference the Downward API variables defined before them. */}}
{{- define "podserve.otelEnv" -}}
- name: PODSERVE_TRACING_ENABLED
  value: {{ .Values.tracing.enabled | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ default (include "podserve.fullname" .) .Values.tracing.serviceName | quote }}
{{- if .Values.tracing.enabled }}
{{- $endpoint := include "podserve.otlpEndpoint" . }}
{{- if $endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $endpoint | quote }}
{{- end }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .Values.tracing.protocol | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .Values.tracing.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .Values.tracing.samplerArg | quote }}
{{- end }}
{{- $attrs := list "k8s.pod.name=$(POD_NAME)" "k8s.namespace.name=$(POD_NAMESPACE)" "k8s.node.name=$(NODE_NAME)" (printf "service.version=%s" (include "podserve.imageTag" .)) }}
{{- range $k, $v := .Values.tracing.resourceAttributes }}
{{- $attrs = append $attrs (printf "%s=%s" $k $v) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attrs | quote }}
{{- end }}
