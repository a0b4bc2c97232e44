{{/* Names, labels and shared snippets. */}}

{{- define "selfspec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name. 40 characters at most: KubeRay appends "-engine" to
name the RayService (at most 47), then "-xxxxx" for its RayCluster and "-serve-svc" for
its Services, and all of those must stay within 63.
*/}}
{{- define "selfspec.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "selfspec.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the release's pods; NetworkPolicies rely on them. */}}
{{- define "selfspec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "selfspec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "selfspec.labels" -}}
helm.sh/chart: {{ include "selfspec.chart" . }}
{{ include "selfspec.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: selfspec
{{- end }}

{{/* Labels of one component; call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "selfspec.componentLabels" -}}
{{ include "selfspec.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "selfspec.componentSelector" -}}
{{ include "selfspec.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "selfspec.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "selfspec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "selfspec.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The RayService, and the Serve Service that KubeRay creates for it. */}}
{{- define "selfspec.rayServiceName" -}}
{{- printf "%s-engine" (include "selfspec.fullname" .) }}
{{- end }}

{{- define "selfspec.serveServiceName" -}}
{{- printf "%s-serve-svc" (include "selfspec.rayServiceName" .) }}
{{- end }}

{{- define "selfspec.gatewayTokenSecretName" -}}
{{- default (printf "%s-gateway-token" (include "selfspec.fullname" .)) .Values.gateway.auth.existingSecret }}
{{- end }}

{{/* The controller admin API's tokens: keys `token` (operator) and `read-token` (read-only). */}}
{{- define "selfspec.controllerAdminSecretName" -}}
{{- default (printf "%s-controller-admin" (include "selfspec.fullname" .)) .Values.controller.admin.existingSecret }}
{{- end }}

{{/* The fleet's internal credential (key `token`): the gateway proves with it to Serve's
replicas that a call came through it. */}}
{{- define "selfspec.internalSecretName" -}}
{{- default (printf "%s-internal" (include "selfspec.fullname" .)) .Values.internalAuth.existingSecret }}
{{- end }}

{{/* Where the internal credential is mounted, in the gateway and in every Ray pod. */}}
{{- define "selfspec.internalTokenDir" -}}
/var/run/selfspec/internal
{{- end }}

{{/* The internal credential as a read-only volume; a Secret volume without subPath is
updated in place when the Secret changes, so a rotated token reaches running pods. */}}
{{- define "selfspec.internalTokenVolume" -}}
- name: internal-token
  secret:
    secretName: {{ include "selfspec.internalSecretName" . }}
    defaultMode: 0440
    items:
      - {key: token, path: token}
{{- end }}

{{- define "selfspec.internalTokenMount" -}}
- {name: internal-token, mountPath: {{ include "selfspec.internalTokenDir" . }}, readOnly: true}
{{- end }}

{{- define "selfspec.internalTokenEnv" -}}
- name: SELFSPEC_INTERNAL_TOKEN_FILE
  value: {{ include "selfspec.internalTokenDir" . }}/token
{{- end }}

{{/*
A Secret value that survives upgrades: the one in the cluster if there is one, else the
given value, else a random one. Call with (dict "ctx" $ "name" N "key" K "value" V).
*/}}
{{- define "selfspec.secretValue" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name }}
{{- if and $existing (index ($existing.data | default dict) .key) }}
{{- index $existing.data .key }}
{{- else if .value }}
{{- .value | b64enc }}
{{- else }}
{{- randAlphaNum 40 | b64enc }}
{{- end }}
{{- end }}

{{/* Env shared by every selfspec container (Redis credentials: selfspec.redisEnv). */}}
{{- define "selfspec.commonEnv" -}}
# The root filesystem is read-only: caches (Triton, torch extensions, matplotlib) go to /tmp.
- name: HOME
  value: /tmp
{{- with .Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/* The restricted Pod Security Standard, for containers that run our image as uid 1000. */}}
{{- define "selfspec.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "selfspec.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Engine replicas' worst-case GPU count across all worker groups at the given replica field. */}}
{{- define "selfspec.workerGpus" -}}
{{- $field := .field }}
{{- $total := 0 }}
{{- range .ctx.Values.engine.workerGroups }}
{{- $gpus := index .resources.limits "nvidia.com/gpu" | int }}
{{- $total = add $total (mul $gpus (index . $field | int)) }}
{{- end }}
{{- $total }}
{{- end }}
