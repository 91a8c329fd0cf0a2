{{/* Names, labels and images shared by the templates. */}}

{{- define "flux-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flux-agent.fullname" -}}
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

{{/* The injector's Deployment, Service and certificate name. */}}
{{- define "flux-agent.injector" -}}
{{- printf "%s-injector" (include "flux-agent.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flux-agent.tlsSecret" -}}
{{- if eq .Values.tls.mode "secret" }}
{{- .Values.tls.secret.name }}
{{- else }}
{{- printf "%s-tls" (include "flux-agent.injector" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "flux-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "flux-agent.injector" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "flux-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flux-agent.labels" -}}
helm.sh/chart: {{ include "flux-agent.chart" . }}
app.kubernetes.io/name: {{ include "flux-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: flux-agent
{{- end }}

{{- define "flux-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flux-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: injector
{{- end }}

{{- define "flux-agent.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The injected agent's image: sidecar.image, pinned by its digest (a field, or
     REPOSITORY@sha256:... as the repository), else the chart's image. */}}
{{- define "flux-agent.sidecarImage" -}}
{{- $image := .Values.sidecar.image }}
{{- if not (or $image.repository $image.tag $image.digest) }}
{{- include "flux-agent.image" . }}
{{- else }}
{{- $repository := default .Values.image.repository $image.repository }}
{{- if contains "@" $repository }}
{{- $repository }}
{{- else if $image.digest }}
{{- printf "%s@%s" $repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Namespaces the webhook never touches. */}}
{{- define "flux-agent.excludedNamespaces" -}}
{{- $out := list .Release.Namespace "kube-system" "kube-public" }}
{{- range .Values.webhook.excludedNamespaces }}
{{- if not (has . $out) }}
{{- $out = append $out . }}
{{- end }}
{{- end }}
{{- join "," $out }}
{{- end }}

{{/* The webhook's DNS names: the Service in every form a client may use. */}}
{{- define "flux-agent.dnsNames" -}}
{{- $svc := include "flux-agent.injector" . }}
{{- $ns := .Release.Namespace }}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) | toJson }}
{{- end }}

{{/* The namespace-to-agencies map the injector binds pods by (agent.agency is "*"). */}}
{{- define "flux-agent.agencyBindings" -}}
{{- $bindings := deepCopy .Values.agent.agencyBindings }}
{{- if and .Values.agent.agency (not (hasKey $bindings "*")) }}
{{- $_ := set $bindings "*" .Values.agent.agency }}
{{- end }}
{{- toJson $bindings }}
{{- end }}

{{/* Non-empty when the injector reads Namespace annotations through the API. */}}
{{- define "flux-agent.readsNamespaces" -}}
{{- if and .Values.agent.namespaceBinding (ne .Values.agent.auth "jwt") }}true{{ end }}
{{- end }}
