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

{{/* ------------------------------------------------------------------ the aggregator tier */}}

{{/* The StatefulSet and its Service (52 characters at most: a StatefulSet's pods carry a
     controller-revision-hash label of its name and a hash, within 63). */}}
{{- define "flux-agent.aggregator" -}}
{{- printf "%s-aggregator" (include "flux-agent.fullname" .) | trunc 52 | trimSuffix "-" }}
{{- end }}

{{/* The headless Service that governs the StatefulSet (one DNS name per replica). */}}
{{- define "flux-agent.aggregatorPods" -}}
{{- printf "%s-pods" (include "flux-agent.aggregator" .) }}
{{- end }}

{{- define "flux-agent.aggregatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "flux-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: aggregator
{{- end }}

{{- define "flux-agent.aggregatorTlsSecret" -}}
{{- if eq .Values.tls.mode "secret" }}
{{- .Values.aggregator.tls.secretName }}
{{- else }}
{{- printf "%s-tls" (include "flux-agent.aggregator" .) }}
{{- end }}
{{- end }}

{{/* Where sidecars deliver: sidecar.upstream, else the aggregator when it is enabled. */}}
{{- define "flux-agent.sidecarUpstream" -}}
{{- if .Values.sidecar.upstream }}
{{- .Values.sidecar.upstream }}
{{- else if .Values.aggregator.enabled }}aggregator
{{- else }}database
{{- end }}
{{- end }}

{{/* The URL sidecars reach the aggregators by (empty without them). */}}
{{- define "flux-agent.aggregatorURL" -}}
{{- if .Values.aggregator.enabled }}
{{- printf "%s://%s.%s.svc:%d" (ternary "https" "http" .Values.aggregator.tls.enabled) (include "flux-agent.aggregator" .) .Release.Namespace (int .Values.aggregator.port) }}
{{- end }}
{{- end }}

{{/* The aggregator certificate's DNS names: its Service in every form, and each replica. */}}
{{- define "flux-agent.aggregatorDnsNames" -}}
{{- $svc := include "flux-agent.aggregator" . }}
{{- $pods := include "flux-agent.aggregatorPods" . }}
{{- $ns := .Release.Namespace }}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) (printf "*.%s.%s.svc" $pods $ns) (printf "*.%s.%s.svc.cluster.local" $pods $ns) | toJson }}
{{- end }}

{{/* The namespaces whose pods opt in, for the CA ConfigMap and the NetworkPolicy. */}}
{{- define "flux-agent.optedInNamespaces" -}}
{{- $out := list }}
{{- range .Values.agent.namespaces }}
{{- if not (has . $out) }}
{{- $out = append $out . }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* FLUX_AGENT_KUBE_BINDINGS of the aggregator, from the bindings the injector uses: one
     NAMESPACE=AGENCY entry per agency a namespace may write as (a namespace bound to
     several is named once per agency), "*" expanded over agent.namespaces. */}}
{{- define "flux-agent.aggregatorBindings" -}}
{{- $bindings := include "flux-agent.agencyBindings" . | fromJson }}
{{- $entries := list }}
{{- $named := list }}
{{- range $namespace, $agencies := $bindings }}
{{- if ne $namespace "*" }}
{{- $named = append $named $namespace }}
{{- range (ternary (list $agencies) $agencies (kindIs "string" $agencies)) }}
{{- $entries = append $entries (printf "%s=%s" $namespace .) }}
{{- end }}
{{- end }}
{{- end }}
{{- if hasKey $bindings "*" }}
{{- if not .Values.agent.namespaces }}
{{- fail "aggregator.enabled: the aggregator needs every namespace's agencies by name; agent.agencyBindings \"*\" (or agent.agency) stands for namespaces it cannot list: set agent.namespaces, or bind each namespace in agent.agencyBindings" }}
{{- end }}
{{- $any := get $bindings "*" }}
{{- range (include "flux-agent.optedInNamespaces" . | fromJsonArray) }}
{{- $namespace := . }}
{{- if not (has $namespace $named) }}
{{- range (ternary (list $any) $any (kindIs "string" $any)) }}
{{- $entries = append $entries (printf "%s=%s" $namespace .) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- join "," $entries }}
{{- end }}

{{/* FLUX_AGENT_SPOOL_MAX_BYTES of an aggregator: its claim less 10% (at least 32Mi), as the
     injector leaves headroom on a sidecar's volume. */}}
{{- define "flux-agent.aggregatorSpoolMaxBytes" -}}
{{- $size := .Values.aggregator.spool.size }}
{{- $units := dict "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 }}
{{- $bytes := mul (regexFind "^[0-9]+" $size | int64) (get $units (regexFind "(Mi|Gi|Ti)$" $size)) }}
{{- sub $bytes (max (div $bytes 10) 33554432) }}
{{- end }}

{{/* What the aggregator needs of the rest of the values; fails with the reason. */}}
{{- define "flux-agent.aggregatorChecks" -}}
{{- if include "flux-agent.readsNamespaces" . }}
{{- fail "aggregator.enabled: set agent.namespaceBinding=false and bind every opted-in namespace in agent.agencyBindings: the aggregator checks each record's agency against those bindings and does not read Namespace objects, so a namespace bound by its annotation alone could never deliver" }}
{{- end }}
{{- if not (include "flux-agent.aggregatorBindings" .) }}
{{- fail "aggregator.enabled: agent.agencyBindings (or agent.agency) binds no namespace: the aggregator would refuse every record" }}
{{- end }}
{{- if not (or .Values.agent.namespaces .Values.aggregator.networkPolicy.clientNamespaceSelector) }}
{{- fail "aggregator.enabled: list the namespaces whose pods opt in (agent.namespaces) or select them (aggregator.networkPolicy.clientNamespaceSelector): only their pods may reach the aggregators" }}
{{- end }}
{{- $drain := .Values.aggregator.drainTimeout }}
{{- $seconds := mul (regexFind "^[0-9]+" $drain | int64) (ternary 60 1 (hasSuffix "m" $drain)) }}
{{- if le (int64 .Values.aggregator.terminationGracePeriodSeconds) $seconds }}
{{- fail (printf "aggregator.terminationGracePeriodSeconds (%d) must exceed aggregator.drainTimeout (%s): the kubelet kills an aggregator that is still draining" (int .Values.aggregator.terminationGracePeriodSeconds) $drain) }}
{{- end }}
{{- if and .Values.aggregator.tls.enabled (or (eq .Values.tls.mode "secret") (and (eq .Values.tls.mode "certManager") .Values.tls.certManager.issuerRef)) (not .Values.aggregator.tls.caBundle) }}
{{- fail "aggregator.tls.caBundle: required with tls.mode secret, or certManager with an issuerRef: the CA sidecars trust the aggregators by" }}
{{- end }}
{{- if and .Values.aggregator.tls.enabled (eq .Values.tls.mode "secret") (not .Values.aggregator.tls.secretName) }}
{{- fail "aggregator.tls.secretName: required with tls.mode secret (a kubernetes.io/tls Secret for the aggregators)" }}
{{- end }}
{{- end }}
