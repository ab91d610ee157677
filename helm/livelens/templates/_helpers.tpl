{{/*
Chart name.
*/}}
{{- define "livelens.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or <release> when it already contains the chart name.
Kept to 50 characters so that "-triton-models" and similar suffixes stay within 63.
*/}}
{{- define "livelens.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart label value.
*/}}
{{- define "livelens.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Name of one component's resources: (dict "ctx" $ "component" "gateway").
*/}}
{{- define "livelens.componentName" -}}
{{- printf "%s-%s" (include "livelens.fullname" .ctx) .component }}
{{- end }}

{{/*
Selector labels: (dict "ctx" $ "component" "gateway").
*/}}
{{- define "livelens.selectorLabels" -}}
app.kubernetes.io/name: {{ include "livelens.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Common labels: (dict "ctx" $ "component" "gateway"); component may be "".
*/}}
{{- define "livelens.labels" -}}
helm.sh/chart: {{ include "livelens.chart" .ctx }}
app.kubernetes.io/name: {{ include "livelens.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: livelens
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "livelens.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "livelens.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The application image.
*/}}
{{- define "livelens.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The Secret holding the gateway's bearer tokens, and its key.
*/}}
{{- define "livelens.tokensSecretName" -}}
{{- if .Values.gateway.existingSecret }}
{{- .Values.gateway.existingSecret }}
{{- else }}
{{- printf "%s-gateway-tokens" (include "livelens.fullname" .) }}
{{- end }}
{{- end }}

{{- define "livelens.tokensSecretKey" -}}
{{- if .Values.gateway.existingSecret }}
{{- .Values.gateway.existingSecretKey }}
{{- else -}}
tokens
{{- end }}
{{- end }}

{{/*
The gateway tokens as "token1=tenant1,token2=tenant2" (keys in sorted order).
*/}}
{{- define "livelens.tokensString" -}}
{{- $pairs := list }}
{{- range $token, $tenant := .Values.gateway.tokens }}
{{- $pairs = append $pairs (printf "%s=%s" $token $tenant) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/*
Triton's in-cluster host name.
*/}}
{{- define "livelens.tritonHost" -}}
{{- include "livelens.componentName" (dict "ctx" . "component" "triton") }}
{{- end }}

{{/*
Pod-level settings shared by every pod: service account, security context, pull secrets.
*/}}
{{- define "livelens.podCommon" -}}
serviceAccountName: {{ include "livelens.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/*
Container security context.
*/}}
{{- define "livelens.containerSecurityContext" -}}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end }}

{{/*
Pod annotations: checksums of the config and, for the gateway, of the tokens Secret.
*/}}
{{- define "livelens.podAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Environment shared by the livelens services (gateway, encoder, llm).
Settings follow the livelens convention LIVELENS_<SECTION>__<FIELD>.
*/}}
{{- define "livelens.commonEnv" -}}
- name: LIVELENS_CONFIG
  value: /etc/livelens/livelens.yaml
- name: LIVELENS_KAFKA__BOOTSTRAP
  value: {{ required "kafka.bootstrap is required" .Values.kafka.bootstrap | quote }}
- name: LIVELENS_KAFKA__RETENTION_MS
  value: {{ .Values.kafka.retentionMs | int64 | quote }}
{{ include "livelens.kafkaSecurityEnv" . }}
- name: LIVELENS_BROKER__ENABLED
  value: "false"
- name: LIVELENS_TRITON__ENABLED
  value: "false"
- name: LIVELENS_TRITON__HOST
  value: {{ include "livelens.tritonHost" . | quote }}
- name: LIVELENS_TRITON__GRPC_PORT
  value: {{ .Values.triton.ports.grpc | quote }}
- name: LIVELENS_TRITON__HTTP_PORT
  value: {{ .Values.triton.ports.http | quote }}
- name: LIVELENS_TRITON__METRICS_PORT
  value: {{ .Values.triton.ports.metrics | quote }}
- name: LIVELENS_ENCODER__TRITON_URL
  value: {{ printf "%s:%v" (include "livelens.tritonHost" .) .Values.triton.ports.grpc | quote }}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: PYTHONUNBUFFERED
  value: "1"
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end }}

{{/*
Kafka security. "livelens.kafkaTLS" / "livelens.kafkaSASL" render "true" when the
protocol uses TLS / SASL (empty otherwise, so they work in `if`).
*/}}
{{- define "livelens.kafkaTLS" -}}
{{- if has .Values.kafka.security.protocol (list "SSL" "SASL_SSL") }}true{{ end }}
{{- end }}

{{- define "livelens.kafkaSASL" -}}
{{- if hasPrefix "SASL_" .Values.kafka.security.protocol }}true{{ end }}
{{- end }}

{{/*
Fails rendering when kafka.security is incomplete for its protocol.
*/}}
{{- define "livelens.validateKafkaSecurity" -}}
{{- $s := .Values.kafka.security }}
{{- if and (include "livelens.kafkaTLS" .) (not $s.tls.secretName) }}
{{- fail (printf "kafka.security.protocol %s needs kafka.security.tls.secretName: a Secret holding ca.crt (the CA that signed the brokers' certificates)" $s.protocol) }}
{{- end }}
{{- if include "livelens.kafkaSASL" . }}
{{- $missing := list }}
{{- if not $s.sasl.mechanism }}
{{- $missing = append $missing "kafka.security.sasl.mechanism (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)" }}
{{- end }}
{{- if not $s.sasl.username }}
{{- $missing = append $missing "kafka.security.sasl.username" }}
{{- end }}
{{- if not (and $s.sasl.passwordSecret.name $s.sasl.passwordSecret.key) }}
{{- $missing = append $missing "kafka.security.sasl.passwordSecret.name and .key (the Secret key holding the password)" }}
{{- end }}
{{- with $missing }}
{{- fail (printf "kafka.security.protocol %s needs %s" $s.protocol (join ", " .)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Kafka security settings of every livelens service (part of livelens.commonEnv).
*/}}
{{- define "livelens.kafkaSecurityEnv" -}}
{{- include "livelens.validateKafkaSecurity" . }}
{{- $s := .Values.kafka.security -}}
- name: LIVELENS_KAFKA__SECURITY_PROTOCOL
  value: {{ $s.protocol | quote }}
{{- if include "livelens.kafkaTLS" . }}
- name: LIVELENS_KAFKA__SSL_CAFILE
  value: {{ printf "%s/ca.crt" $s.tls.mountPath | quote }}
{{- if $s.tls.clientAuth }}
- name: LIVELENS_KAFKA__SSL_CERTFILE
  value: {{ printf "%s/tls.crt" $s.tls.mountPath | quote }}
- name: LIVELENS_KAFKA__SSL_KEYFILE
  value: {{ printf "%s/tls.key" $s.tls.mountPath | quote }}
{{- end }}
{{- end }}
{{- if include "livelens.kafkaSASL" . }}
- name: LIVELENS_KAFKA__SASL_MECHANISM
  value: {{ $s.sasl.mechanism | quote }}
- name: LIVELENS_KAFKA__SASL_USERNAME
  value: {{ $s.sasl.username | quote }}
- name: LIVELENS_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $s.sasl.passwordSecret.name }}
      key: {{ $s.sasl.passwordSecret.key }}
{{- end }}
{{- end }}

{{/*
prometheus.io pod annotations (metrics.podAnnotations): (dict "ctx" $ "port" 50061).
*/}}
{{- define "livelens.metricsAnnotations" -}}
{{- if .ctx.Values.metrics.podAnnotations }}
{{- $own := .ctx.Values.podAnnotations | default dict }}
{{- $annotations := dict }}
{{- range $key, $value := dict "prometheus.io/scrape" "true" "prometheus.io/port" (toString .port) "prometheus.io/path" "/metrics" }}
{{- if not (hasKey $own $key) }}{{/* podAnnotations, given explicitly, win */}}
{{- $_ := set $annotations $key $value }}
{{- end }}
{{- end }}
{{- with $annotations }}
{{- toYaml . }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The partitions of the livelens topics: config.kafka.partitions, else the embedded
default of sdk/livelens/config.py (4).
*/}}
{{- define "livelens.kafkaPartitions" -}}
{{- dig "kafka" "partitions" 4 (.Values.config | default dict) | int }}
{{- end }}

{{/*
Volume mounts and volumes shared by every livelens container: /tmp, the config and,
with Kafka over TLS, the Kafka TLS Secret.
*/}}
{{- define "livelens.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: config
  mountPath: /etc/livelens/livelens.yaml
  subPath: livelens.yaml
  readOnly: true
{{- if include "livelens.kafkaTLS" . }}
- name: kafka-tls
  mountPath: {{ .Values.kafka.security.tls.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "livelens.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end }}

{{- define "livelens.commonVolumes" -}}
{{ include "livelens.tmpVolume" . }}
- name: config
  configMap:
    name: {{ include "livelens.componentName" (dict "ctx" . "component" "config") }}
{{- if include "livelens.kafkaTLS" . }}
- name: kafka-tls
  secret:
    secretName: {{ .Values.kafka.security.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/*
GPU resources: (dict "resources" .Values.x.resources "gpus" .Values.x.gpu.count).
The GPU count always wins over any nvidia.com/gpu given in resources.limits.
*/}}
{{- define "livelens.gpuResources" -}}
{{- $limits := merge (dict "nvidia.com/gpu" (int .gpus)) (deepCopy (.resources.limits | default dict)) }}
{{- $res := dict "limits" $limits }}
{{- with .resources.requests }}
{{- $_ := set $res "requests" (deepCopy .) }}
{{- end }}
{{- toYaml $res }}
{{- end }}
