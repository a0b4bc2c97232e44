{{/*
The pod template of a Ray head or worker group. Call with (dict "ctx" $ "group" NAME
"resources" R "shmSize" S "nodeSelector" N "tolerations" T "affinity" A "isHead" BOOL
"gpus" G), G being the GPUs of one pod of the group (0 for the head).
KubeRay adds the `ray start` command, its own env and probes to the first container.
*/}}
{{- define "selfspec.rayPodTemplate" -}}
{{- $ctx := .ctx }}
{{- $values := $ctx.Values }}
{{- $engine := $values.engine -}}
metadata:
  labels:
    {{- include "selfspec.componentLabels" (dict "ctx" $ctx "component" "engine") | nindent 4 }}
    selfspec.io/ray-group: {{ .group }}
spec:
  {{- /* The head's autoscaler sidecar talks to the Kubernetes API; nothing else does. */}}
  automountServiceAccountToken: {{ and .isHead $engine.autoscaling.enabled }}
  terminationGracePeriodSeconds: {{ $engine.terminationGracePeriodSeconds | int64 }}
  securityContext:
    {{- include "selfspec.podSecurityContext" $ctx | nindent 4 }}
  {{- with $values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ if .isHead }}ray-head{{ else }}ray-worker{{ end }}
      image: {{ include "selfspec.image" $ctx }}
      imagePullPolicy: {{ $values.image.pullPolicy }}
      ports:
        {{- if .isHead }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        {{- end }}
        # Not named "serve": see serveService in rayservice.yaml.
        - {name: http, containerPort: 8000}
        - {name: serve-grpc, containerPort: 9000}
        - {name: metrics, containerPort: 8080}
        {{- /* Engine replicas' /metrics: one replica per GPU, each on the first free port
        of engine.metrics.port and up, so a pod with G GPUs serves them on port..port+G-1. */}}
        {{- range $i := until (int .gpus) }}
        - {name: {{ include "selfspec.replicaMetricsPortName" $i }}, containerPort: {{ add $engine.metrics.port $i }}}
        {{- end }}
      env:
        {{- include "selfspec.commonEnv" $ctx | nindent 8 }}
        {{- if not .isHead }}
        {{- /* Engine replicas run on workers alone (the head has no GPU). */}}
        {{- include "selfspec.redisEnv" (dict "ctx" $ctx "role" "replica") | nindent 8 }}
        {{- end }}
        {{- /* Serve's replicas accept only calls that carry it (the gateway's). */}}
        {{- include "selfspec.internalTokenEnv" $ctx | nindent 8 }}
        - name: SELFSPEC_CACHE_DIR
          value: /cache
        - name: RAY_USAGE_STATS_ENABLED
          value: "0"
        - name: HF_HUB_OFFLINE
          value: "1"
        {{- if $values.otel.endpoint }}
        - name: OTEL_SERVICE_NAME
          value: selfspec-engine
        # Serve's gRPC proxy, router and replicas trace into our provider, joining the
        # gateway's trace (services/common/telemetry.py).
        - name: RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH
          value: services.common.telemetry:serve_span_processors
        {{- end }}
      {{- /* Let Ray hand its work back before the pod goes (KubeRay's recommendation). */}}
      lifecycle:
        preStop:
          exec:
            command: ["ray", "stop"]
      resources:
        {{- toYaml .resources | nindent 8 }}
      securityContext:
        {{- include "selfspec.containerSecurityContext" $ctx | nindent 8 }}
      volumeMounts:
        # Ray's session directory, logs and spill files live under /tmp.
        - {name: tmp, mountPath: /tmp}
        - {name: dshm, mountPath: /dev/shm}
        - {name: model-cache, mountPath: /cache}
        {{- include "selfspec.internalTokenMount" $ctx | nindent 8 }}
  volumes:
    {{- include "selfspec.internalTokenVolume" $ctx | nindent 4 }}
    - name: tmp
      emptyDir: {}
    # The default 64 MiB /dev/shm is far too small for Ray's object store.
    - name: dshm
      emptyDir:
        medium: Memory
        {{- with .shmSize }}
        sizeLimit: {{ . }}
        {{- end }}
    - name: model-cache
      {{- if eq $engine.modelCache.type "persistentVolumeClaim" }}
      persistentVolumeClaim:
        claimName: {{ include "selfspec.modelCacheClaim" $ctx }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ $engine.modelCache.sizeLimit }}
      {{- end }}
{{- end }}

{{- define "selfspec.modelCacheClaim" -}}
{{- default (printf "%s-model-cache" (include "selfspec.fullname" .)) .Values.engine.modelCache.persistentVolumeClaim.existingClaim }}
{{- end }}

{{/* The container port name of the i-th engine replica's /metrics on a Ray worker pod. */}}
{{- define "selfspec.replicaMetricsPortName" -}}
{{- printf "replica-m%d" (int .) }}
{{- end }}

{{/* The most GPUs (so engine replicas) one Ray worker pod of any group holds. */}}
{{- define "selfspec.maxPodGpus" -}}
{{- $most := 0 }}
{{- range .Values.engine.workerGroups }}
{{- $most = max $most (index .resources.limits "nvidia.com/gpu" | int) }}
{{- end }}
{{- $most }}
{{- end }}
