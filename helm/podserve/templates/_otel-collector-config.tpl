{{/* Configuration of the development OpenTelemetry Collector. */}}
{{- define "podserve.otelCollectorConfig" -}}
{{- $fullname := include "podserve.fullname" . -}}
extensions:
  health_check:
    endpoint: 0.0.0.0:13133
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 0.0.0.0:4317
      http:
        endpoint: 0.0.0.0:4318
processors:
  memory_limiter:
    check_interval: 1s
    limit_percentage: 80
    spike_limit_percentage: 20
  batch: {}
exporters:
  debug:
    verbosity: basic
  {{- if .Values.jaeger.enabled }}
  otlp/jaeger:
    endpoint: {{ $fullname }}-jaeger:4317
    tls:
      insecure: true
  {{- end }}
service:
  extensions: [health_check]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [memory_limiter, batch]
      exporters: [debug{{ if .Values.jaeger.enabled }}, otlp/jaeger{{ end }}]
{{- end }}
