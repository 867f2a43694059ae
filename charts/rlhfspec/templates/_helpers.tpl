{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "rlhfspec.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name of the operator's objects. */}}
{{- define "rlhfspec.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "rlhfspec.labels" -}}
app.kubernetes.io/name: {{ include "rlhfspec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: rlhfspec
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "rlhfspec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rlhfspec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "rlhfspec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rlhfspec.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "rlhfspec.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Exactly the verbs the operator uses: mirrors rlhfspec_operator.rbac.RULES (a test
compares them; the operator's own tests check every request it makes against RULES). */}}
{{- define "rlhfspec.rules" -}}
- apiGroups: [rlhfspec.io]
  resources: [rlhfjobs]
  verbs: [list, watch, patch, delete]
- apiGroups: [rlhfspec.io]
  resources: [rlhfjobs/status]
  verbs: [patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch, delete]
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, get, delete]
- apiGroups: [""]
  resources: [services, persistentvolumeclaims]
  verbs: [get, create, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, create, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, delete]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- if .Values.peering.enabled }}
- apiGroups: [kopf.dev]
  resources: [{{ if .Values.watchNamespaces }}kopfpeerings{{ else }}clusterkopfpeerings{{ end }}]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end -}}
