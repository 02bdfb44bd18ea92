{{/* The chart's name, or nameOverride. */}}
{{- define "peermirror.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name for every object. */}}
{{- define "peermirror.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "peermirror.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "peermirror.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* The headless service that lists every node for the DNS bootstrap. */}}
{{- define "peermirror.peersService" -}}
{{- printf "%s-peers" (include "peermirror.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "peermirror.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "peermirror.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the DaemonSet's pods. */}}
{{- define "peermirror.selectorLabels" -}}
app.kubernetes.io/name: {{ include "peermirror.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "peermirror.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The registry folders written under certs.d. */}}
{{- define "peermirror.registryFolders" -}}
{{- if .Values.mirrorAllRegistries }}
{{- list "_default" | toJson }}
{{- else }}
{{- required "registries must list at least one registry (or set mirrorAllRegistries)" (.Values.registries | default list | compact | toJson) }}
{{- end }}
{{- end }}

{{/* Where the init container sees the node's files. */}}
{{- define "peermirror.hostRoot" -}}/host{{- end }}

{{/*
The init container's args: caddy peermirror-configure. Every path is the
node's; --host-root says where the node's files are mounted.
*/}}
{{- define "peermirror.configureArgs" -}}
- peermirror-configure
- --host-root={{ include "peermirror.hostRoot" . }}
- --certs-dir={{ .Values.containerd.certsDir }}
- --containerd-config={{ .Values.containerd.configFile }}
- --containerd-address={{ .Values.containerd.socket }}
{{- range (include "peermirror.registryFolders" . | fromJsonArray) }}
- --registry={{ . }}
{{- end }}
{{- range (.Values.containerd.mirrorTargets | default (list (printf "http://127.0.0.1:%d" (int .Values.mirror.port)))) }}
- --mirror={{ . }}
{{- end }}
{{- range $reg, $url := .Values.containerd.upstreams }}
- --upstream={{ $reg }}={{ $url }}
{{- end }}
{{- if not .Values.containerd.resolveTags }}
- --no-resolve
{{- end }}
- --dial-timeout={{ .Values.containerd.dialTimeout }}
{{- if .Values.containerd.keepExisting }}
- --keep-existing
{{- end }}
{{- if .Values.containerd.failOnConfigError }}
- --fail-on-error
{{- end }}
- --termination-log=/dev/termination-log
{{- end }}

{{/* The same init container's args in the DaemonSet's cleanup form. */}}
{{- define "peermirror.cleanupArgs" -}}
- peermirror-cleanup
- --host-root={{ include "peermirror.hostRoot" . }}
- --certs-dir={{ .Values.containerd.certsDir }}
{{- end }}
