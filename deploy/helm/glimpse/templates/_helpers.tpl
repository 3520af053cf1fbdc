{{/*
Names, labels and shared pod fragments of the Glimpse chart.
*/}}

{{- define "glimpse.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>" unless the release name already contains the chart name. */}}
{{- define "glimpse.fullname" -}}
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

{{- define "glimpse.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "glimpse.labels" -}}
helm.sh/chart: {{ include "glimpse.chart" . }}
app.kubernetes.io/name: {{ include "glimpse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: glimpse
{{- end }}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "encoder"). */}}
{{- define "glimpse.selectorLabels" -}}
app.kubernetes.io/name: {{ include "glimpse.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "glimpse.componentLabels" -}}
{{ include "glimpse.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "glimpse.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "glimpse.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "glimpse.gpuImage" -}}
{{- printf "%s:%s" .Values.image.gpu.repository (default .Chart.AppVersion .Values.image.gpu.tag) }}
{{- end }}

{{- define "glimpse.gatewayImage" -}}
{{- printf "%s:%s" .Values.image.gateway.repository (default .Chart.AppVersion .Values.image.gateway.tag) }}
{{- end }}

{{/* In-cluster addresses: the headless Services give one DNS record per ready pod. */}}
{{- define "glimpse.encoderService" -}}
{{- printf "%s-encoder" (include "glimpse.fullname" .) }}
{{- end }}

{{- define "glimpse.decoderService" -}}
{{- printf "%s-decoder" (include "glimpse.fullname" .) }}
{{- end }}

{{/* Fully qualified, so gRPC's DNS resolver needs no search domains. */}}
{{- define "glimpse.encoderAddress" -}}
{{- printf "%s.%s.svc.%s:%d" (include "glimpse.encoderService" .) .Release.Namespace .Values.clusterDomain (int .Values.encoder.port) }}
{{- end }}

{{- define "glimpse.decoderAddress" -}}
{{- printf "%s.%s.svc.%s:%d" (include "glimpse.decoderService" .) .Release.Namespace .Values.clusterDomain (int .Values.decoder.port) }}
{{- end }}

{{- define "glimpse.apiKeySecretName" -}}
{{- default (printf "%s-api-key" (include "glimpse.fullname" .)) .Values.gateway.apiKey.existingSecret }}
{{- end }}

{{/* Whether the gateway reads an API key from a Secret. */}}
{{- define "glimpse.apiKeyEnabled" -}}
{{- if or .Values.gateway.apiKey.existingSecret .Values.gateway.apiKey.value .Values.gateway.apiKey.generate }}true{{- end }}
{{- end }}

{{- define "glimpse.modelPath" -}}
{{- if eq .Values.model.source "embedded" }}
{{- .Values.model.embeddedPath }}
{{- else }}
{{- .Values.model.mountPath }}
{{- end }}
{{- end }}

{{/* Fail early on a model source that names no volume. */}}
{{- define "glimpse.validateModel" -}}
{{- $src := .Values.model.source }}
{{- if not (has $src (list "embedded" "pvc" "hostPath")) }}
{{- fail (printf "model.source must be embedded, pvc or hostPath (got %q)" $src) }}
{{- end }}
{{- if and (eq $src "pvc") (not .Values.model.pvc.claimName) }}
{{- fail "model.source=pvc needs model.pvc.claimName" }}
{{- end }}
{{- if and (eq $src "hostPath") (not .Values.model.hostPath.path) }}
{{- fail "model.source=hostPath needs model.hostPath.path" }}
{{- end }}
{{- end }}

{{/* Volumes of encoder and decoder pods: the checkpoint (unless embedded), /dev/shm and /tmp.
Include with (dict "ctx" $ "shmSize" .Values.encoder.shmSize). */}}
{{- define "glimpse.modelVolumes" -}}
{{- $v := .ctx.Values }}
{{- include "glimpse.validateModel" .ctx }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
- name: tmp
  emptyDir: {}
{{- if eq $v.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $v.model.pvc.claimName }}
    readOnly: true
{{- else if eq $v.model.source "hostPath" }}
- name: model
  hostPath:
    path: {{ $v.model.hostPath.path }}
    type: Directory
{{- end }}
{{- end }}

{{- define "glimpse.modelMounts" -}}
- name: dshm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
{{- if ne .Values.model.source "embedded" }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
  {{- if and (eq .Values.model.source "pvc") .Values.model.pvc.subPath }}
  subPath: {{ .Values.model.pvc.subPath }}
  {{- end }}
{{- end }}
{{- end }}

{{/* nodeSelector of a GPU component: gpu.nodeSelector merged under the component's own. */}}
{{- define "glimpse.gpuNodeSelector" -}}
{{- $sel := deepCopy .component.nodeSelector }}
{{- if .ctx.Values.gpu.enabled }}
{{- $sel = merge $sel (deepCopy .ctx.Values.gpu.nodeSelector) }}
{{- end }}
{{- with $sel }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "glimpse.gpuTolerations" -}}
{{- $tol := .component.tolerations }}
{{- if .ctx.Values.gpu.enabled }}
{{- $tol = concat .ctx.Values.gpu.tolerations .component.tolerations }}
{{- end }}
{{- with $tol }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Resources of a GPU component: its CPU/memory plus `count` GPUs when gpu.enabled. */}}
{{- define "glimpse.gpuResources" -}}
{{- $res := deepCopy .component.resources }}
{{- if .ctx.Values.gpu.enabled }}
{{- $limits := default dict $res.limits }}
{{- $_ := set $limits .ctx.Values.gpu.resourceName (int .count) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* gRPC probes of the encoder and decoder (grpc.health.v1, overall server status). */}}
{{- define "glimpse.grpcProbes" -}}
startupProbe:
  grpc:
    port: {{ .port }}
  {{- toYaml .probes.startup | nindent 2 }}
readinessProbe:
  grpc:
    port: {{ .port }}
  {{- toYaml .probes.readiness | nindent 2 }}
livenessProbe:
  grpc:
    port: {{ .port }}
  {{- toYaml .probes.liveness | nindent 2 }}
{{- end }}
