{{/* The NOTES.txt body, as a named template so the test suite can render it without a cluster. */}}
{{- define "shrinkserve.notes" -}}
shrinkserve {{ .Chart.AppVersion }} is deploying as {{ include "shrinkserve.fullname" . }} in namespace {{ .Release.Namespace }}.

1. Wait until it is ready. The first start of a fresh cache builds every eager profile (the startup
   probe allows {{ mul .Values.probes.startup.periodSeconds .Values.probes.startup.failureThreshold }} s); /ready lists each profile's state:

  kubectl -n {{ .Release.Namespace }} rollout status deployment/{{ include "shrinkserve.fullname" . }}

2. Reach the OpenAI-compatible API:
{{- if eq .Values.service.type "ClusterIP" }}

  kubectl -n {{ .Release.Namespace }} port-forward service/{{ include "shrinkserve.fullname" . }} 8000:{{ .Values.service.port }}
  export OPENAI_BASE_URL=http://127.0.0.1:8000/v1

  Inside the cluster: http://{{ include "shrinkserve.fullname" . }}.{{ .Release.Namespace }}.svc:{{ .Values.service.port }}/v1
{{- else if eq .Values.service.type "NodePort" }}

  export NODE_PORT=$(kubectl -n {{ .Release.Namespace }} get service {{ include "shrinkserve.fullname" . }} -o jsonpath="{.spec.ports[0].nodePort}")
  export NODE_IP=$(kubectl get nodes -o jsonpath="{.items[0].status.addresses[0].address}")
  export OPENAI_BASE_URL=http://$NODE_IP:$NODE_PORT/v1
{{- else if eq .Values.service.type "LoadBalancer" }}

  export SERVICE_IP=$(kubectl -n {{ .Release.Namespace }} get service {{ include "shrinkserve.fullname" . }} -o jsonpath="{.status.loadBalancer.ingress[0].ip}")
  export OPENAI_BASE_URL=http://$SERVICE_IP:{{ .Values.service.port }}/v1
{{- end }}

  curl $OPENAI_BASE_URL/models{{ if include "shrinkserve.apiKeysEnabled" . }} -H "Authorization: Bearer <one of your API keys>"{{ end }}
  curl $OPENAI_BASE_URL/chat/completions -H 'Content-Type: application/json'{{ if include "shrinkserve.apiKeysEnabled" . }} -H "Authorization: Bearer <key>"{{ end }} \
    -d '{"model": "{{ keys .Values.config.profiles | sortAlpha | first }}", "messages": [{"role": "user", "content": "Hello!"}]}'

  Profiles (the request's "model"): {{ keys .Values.config.profiles | sortAlpha | join ", " }}
{{- with .Values.config.routes }}
  Pinned routes: {{ $out := list }}{{ range $prefix, $profile := . }}{{ $out = append $out (printf "%s/v1 → %s" $prefix $profile) }}{{ end }}{{ join ", " $out }}
{{- end }}
{{- if include "shrinkserve.apiKeysEnabled" . }}

  API keys are required (Secret {{ include "shrinkserve.apiKeysSecretName" . }}, key {{ .Values.apiKeys.existingSecretKey }}).
{{- else }}

  No API keys are set: anyone who reaches the Service can use it (set apiKeys.keys or apiKeys.existingSecret).
{{- end }}

3. Metrics: GET /metrics on port {{ .Values.server.port }}.
{{- if .Values.metrics.serviceMonitor.enabled }} A ServiceMonitor is installed.{{ end }}
{{- if .Values.metrics.podMonitor.enabled }} A PodMonitor is installed.{{ end }}
   Alerting/recording rules and a Grafana dashboard are in the repository's deploy/ folder.
{{- if .Values.gpu.enabled }}

GPU: pods request {{ include "shrinkserve.gpuCount" . }} {{ .Values.gpu.resourceName }} and run the image's CUDA build. hf/int8/int4
profiles run on the PyTorch engine on CUDA (device: auto), GGUF profiles on llama.cpp (CPU).
{{- $vllm := include "shrinkserve.vllmProfiles" . | fromJsonArray }}
{{- if $vllm }}
vLLM profiles (one `vllm serve` child each, {{ .Values.gpu.vllmPython }}): {{ $names := list }}{{ range $vllm }}{{ $names = append $names (printf "%s (tp %d)" .name (int .tp)) }}{{ end }}{{ join ", " $names }}.
Their state (and a child's start-up error with its log tail) is in /ready, their top-1 agreement with the
PyTorch engine in /v1/models (quality.vllm); each child logs to {{ .Values.cache.mountPath }}/logs/vllm-<profile>.log.
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled .Values.autoscaling.requestsWaiting.enabled }}

Autoscaling on shrinkserve_num_requests_waiting needs a custom-metrics adapter serving it
(deploy/prometheus-adapter/rules.yaml); without one the HPA reports the metric as unavailable.
{{- end }}
{{- end }}
