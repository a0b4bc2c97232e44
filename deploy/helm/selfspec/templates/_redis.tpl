{{/*
Redis: one ACL user per role (services/common/redis_acl.py; their rules in
redis/users.yaml, generated from it). Engine replicas log in as `replica`, controllers
as `controller`, each with the password under its own key of one Secret; the gateway
gets no Redis credential. The `default` user keeps the admin password, which only the
chart's Redis pod mounts.
*/}}

{{- define "selfspec.redisName" -}}
{{- printf "%s-redis" (include "selfspec.fullname" .) }}
{{- end }}

{{/* The users and their rules: role -> list of ACL rules. */}}
{{- define "selfspec.redisUsers" -}}
{{- .Files.Get "redis/users.yaml" }}
{{- end }}

{{/* The URL a role logs in with, without its password (SELFSPEC_REDIS_PASSWORD carries
that). Call with (dict "ctx" $ "role" ROLE). */}}
{{- define "selfspec.redisUrl" -}}
{{- $values := .ctx.Values }}
{{- if $values.redis.external.enabled }}
{{- $address := required "redis.external.address is required when redis.external.enabled is true" $values.redis.external.address }}
{{- if contains "@" $address }}
{{- fail "redis.external.address must hold no user or password: each role logs in as its own Redis user (see the README, \"Redis users\")" }}
{{- end }}
{{- if contains "://" $address }}
{{- $parts := splitn "://" 2 $address }}
{{- printf "%s://%s@%s" $parts._0 .role $parts._1 }}
{{- else }}
{{- printf "redis://%s@%s/0" .role $address }}
{{- end }}
{{- else }}
{{- printf "redis://%s@%s:6379/0" .role (include "selfspec.redisName" .ctx) }}
{{- end }}
{{- end }}

{{/* The Secret that holds the users' passwords (and, for the chart's Redis, the admin's). */}}
{{- define "selfspec.redisSecretName" -}}
{{- if .Values.redis.external.enabled }}
{{- required "redis.external.existingSecret is required when redis.external.enabled is true: a Secret with the passwords of the Redis users replica and controller" .Values.redis.external.existingSecret }}
{{- else }}
{{- default (include "selfspec.redisName" .) .Values.redis.auth.existingSecret }}
{{- end }}
{{- end }}

{{/* A role's key in that Secret. Call with (dict "ctx" $ "role" ROLE). */}}
{{- define "selfspec.redisSecretKey" -}}
{{- $user := required (printf "redis.users.%s is missing" .role) (index .ctx.Values.redis.users .role) }}
{{- $user.secretKey }}
{{- end }}

{{/* The env that gives a container its role's Redis user. Call with (dict "ctx" $ "role" ROLE). */}}
{{- define "selfspec.redisEnv" -}}
- name: SELFSPEC_REDIS_URL
  value: {{ include "selfspec.redisUrl" . | quote }}
- name: SELFSPEC_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "selfspec.redisSecretName" .ctx }}
      key: {{ include "selfspec.redisSecretKey" . }}
{{- end }}

{{/* The env variable that holds a role's password in the Redis pod. */}}
{{- define "selfspec.redisPasswordEnv" -}}
{{- printf "REDIS_%s_PASSWORD" (upper .) }}
{{- end }}

{{/* redis-server arguments that create the users: `--user NAME on >PASSWORD RULES...`. */}}
{{- define "selfspec.redisUserArgs" -}}
{{- $users := include "selfspec.redisUsers" . | fromYaml }}
{{- range $role := keys $users | sortAlpha }}
- --user
- {{ $role }}
- "on"
- {{ printf ">$(%s)" (include "selfspec.redisPasswordEnv" $role) | quote }}
{{- range index $users $role }}
- {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}
