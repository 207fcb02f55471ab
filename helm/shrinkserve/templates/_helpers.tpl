{{/* Chart name, truncated to the 63 characters DNS labels allow. */}}
{{- define "shrinkserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. If the release name already contains the chart name it is used as is.
*/}}
{{- define "shrinkserve.fullname" -}}
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

{{- define "shrinkserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "shrinkserve.labels" -}}
{{ include "shrinkserve.selectorLabels" . }}
app.kubernetes.io/component: inference-server
{{ include "shrinkserve.commonLabels" . }}
{{- end }}

{{/* Labels that do not identify the server's pods (the helm test pod has only these + its own). */}}
{{- define "shrinkserve.commonLabels" -}}
helm.sh/chart: {{ include "shrinkserve.chart" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: shrinkserve
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels: immutable on a Deployment, so only name and instance. */}}
{{- define "shrinkserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shrinkserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "shrinkserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "shrinkserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Image reference: the tag defaults to appVersion, plus the GPU suffix for the Dockerfile's gpu target. */}}
{{- define "shrinkserve.image" -}}
{{- $tag := .Values.image.tag }}
{{- if not $tag }}
{{- $tag = .Chart.AppVersion }}
{{- if .Values.gpu.enabled }}
{{- $tag = printf "%s%s" $tag .Values.gpu.imageTagSuffix }}
{{- end }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/*
Engine threads: server.threads, else the CPU limit, else the CPU request, rounded down, at least 1.
Kubernetes CPU quantities: 2, "2", "1.5", "1500m".
*/}}
{{- define "shrinkserve.threads" -}}
{{- if .Values.server.threads }}
{{- .Values.server.threads }}
{{- else }}
{{- $cpu := "" }}
{{- with .Values.resources }}
{{- $cpu = dig "limits" "cpu" "" . | default (dig "requests" "cpu" "" .) }}
{{- end }}
{{- if not $cpu }}
{{- 2 }}
{{- else }}
{{- $s := toString $cpu }}
{{- $n := 0.0 }}
{{- if hasSuffix "m" $s }}
{{- $n = divf (float64 (trimSuffix "m" $s)) 1000 }}
{{- else }}
{{- $n = float64 $s }}
{{- end }}
{{- max 1 (int (floor $n)) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "shrinkserve.cacheClaimName" -}}
{{- .Values.cache.persistence.existingClaim | default (printf "%s-cache" (include "shrinkserve.fullname" .)) }}
{{- end }}

{{/* True ("true") when the cache is the chart's own PVC without ReadWriteMany. */}}
{{- define "shrinkserve.cacheIsRWO" -}}
{{- with .Values.cache.persistence }}
{{- if and .enabled (not .existingClaim) (not (has "ReadWriteMany" .accessModes)) }}true{{ end }}
{{- end }}
{{- end }}

{{- define "shrinkserve.apiKeysSecretName" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "shrinkserve.fullname" .)) }}
{{- end }}

{{- define "shrinkserve.apiKeysEnabled" -}}
{{- if or .Values.apiKeys.existingSecret .Values.apiKeys.keys }}true{{ end }}
{{- end }}

{{/*
The config's `engine: vllm` profiles that run on GPUs (device auto or cuda), as a JSON list of
{name, tp, startup, eager}: tp = vllm.tensor_parallel_size (default 1), startup = vllm.startup_timeout_seconds
(default 600, the server's own limit for one child), eager = the server starts it before /ready (load unset
means eager, except for distill, whose build trains a model). vLLM-CPU profiles (device: cpu) need no GPU.
*/}}
{{- define "shrinkserve.vllmProfiles" -}}
{{- $out := list }}
{{- range $name, $spec := (.Values.config.profiles | default dict) }}
{{- if and $spec (eq (toString ($spec.engine | default "")) "vllm") }}
{{- $v := $spec.vllm | default dict }}
{{- $load := $spec.load | default (ternary "lazy" "eager" (eq (toString $spec.method) "distill")) }}
{{- $out = append $out (dict "name" $name "tp" (int ($v.tensor_parallel_size | default 1))
      "startup" (ceil ($v.startup_timeout_seconds | default 600) | int) "eager" (eq $load "eager")
      "gpu" (ne (toString ($spec.device | default "auto")) "cpu")) }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/*
GPUs the pod requests: gpu.count when set; else the sum of tensor_parallel_size over the GPU vLLM profiles
(each child gets GPUs of its own: vLLM takes gpu_memory_utilization of every GPU it sees), at least 1.
*/}}
{{- define "shrinkserve.gpuCount" -}}
{{- if not (kindIs "invalid" .Values.gpu.count) }}
{{- .Values.gpu.count | int }}
{{- else }}
{{- $sum := 0 }}
{{- range (include "shrinkserve.vllmProfiles" . | fromJsonArray) }}
{{- if .gpu }}{{ $sum = add $sum (int .tp) }}{{ end }}
{{- end }}
{{- max 1 $sum }}
{{- end }}
{{- end }}

{{/*
Startup probe failureThreshold: probes.startup.failureThreshold (builds and scoring) plus, for every eager
vLLM profile (they start one after another), enough periods to cover its startup_timeout_seconds. The probe
then outlasts the server's own limit, so a child that never comes up is reported by the server (profile
failed, the child's log tail in /ready) instead of the kubelet restarting the pod in a loop.
*/}}
{{- define "shrinkserve.startupFailureThreshold" -}}
{{- $period := int .Values.probes.startup.periodSeconds }}
{{- $seconds := 0 }}
{{- range (include "shrinkserve.vllmProfiles" . | fromJsonArray) }}
{{- if .eager }}{{ $seconds = add $seconds (int .startup) }}{{ end }}
{{- end }}
{{- add (int .Values.probes.startup.failureThreshold) (div (add $seconds $period -1) $period) }}
{{- end }}

{{/* Combinations the schema cannot express; fail at render time with the reason. */}}
{{/* preStop sleep + drain + 15 s to stop the engines, unless set explicitly (then it must cover the first two). */}}
{{- define "shrinkserve.drainBudget" -}}
{{- add (int .Values.server.preStopSleepSeconds) (ceil .Values.server.drainTimeoutSeconds | int) -}}
{{- end }}

{{- define "shrinkserve.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add (include "shrinkserve.drainBudget" . | int) 15 -}}
{{- else -}}
{{- .Values.terminationGracePeriodSeconds | int -}}
{{- end -}}
{{- end }}

{{- define "shrinkserve.validate" -}}
{{- if and (not (kindIs "invalid" .Values.terminationGracePeriodSeconds)) (lt (int .Values.terminationGracePeriodSeconds) (include "shrinkserve.drainBudget" . | int)) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must cover server.preStopSleepSeconds + server.drainTimeoutSeconds (%s), or the kubelet kills running generations mid-drain" (int .Values.terminationGracePeriodSeconds) (include "shrinkserve.drainBudget" .)) }}
{{- end }}
{{- if and (or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled) (include "shrinkserve.cacheIsRWO" .) }}
{{- fail "several replicas (replicaCount > 1 or autoscaling.enabled) share the cache PVC: set cache.persistence.accessModes to [ReadWriteMany], or use cache.persistence.existingClaim, or cache.persistence.enabled=false" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled }}
{{- fail "enable metrics.serviceMonitor or metrics.podMonitor, not both: each pod would be scraped twice" }}
{{- end }}
{{- range (include "shrinkserve.vllmProfiles" $ | fromJsonArray) }}
{{- if and .gpu (not $.Values.gpu.enabled) }}
{{- fail (printf "profile %s has engine: vllm on a GPU (device auto or cuda) but gpu.enabled is false: the CPU image has no vLLM and the pod no GPU. Set gpu.enabled=true, or device: cpu on an image with vLLM-CPU" .name) }}
{{- end }}
{{- if and .gpu $.Values.gpu.enabled (gt (int .tp) (include "shrinkserve.gpuCount" $ | int)) }}
{{- fail (printf "profile %s needs vllm.tensor_parallel_size=%d GPUs but the pod requests gpu.count=%s" .name (int .tp) (include "shrinkserve.gpuCount" $)) }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) }}
{{- fail "autoscaling.maxReplicas must be >= autoscaling.minReplicas" }}
{{- end }}
{{- end }}
