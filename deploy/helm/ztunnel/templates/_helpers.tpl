{{/* Name of every object; `ztunnel` as in Istio (istiod trusts istio-system/ztunnel). */}}
{{- define "ztunnel.name" -}}
{{- default "ztunnel" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "ztunnel.labels" -}}
app: {{ include "ztunnel.name" . }}
app.kubernetes.io/name: {{ include "ztunnel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* DaemonSet selector (immutable once installed); same as Istio's ztunnel. */}}
{{- define "ztunnel.selectorLabels" -}}
app: {{ include "ztunnel.name" . }}
{{- end -}}

{{- define "ztunnel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ztunnel.name" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ztunnel.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
