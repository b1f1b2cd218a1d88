{{/*
Names, labels and image references shared by the templates. Nothing here may depend on the
cluster (`lookup`) or on chance (random, generated certificates): `helm template` must give the
same bytes on every run.
*/}}

{{/* The chart's name, or nameOverride; the value of `app.kubernetes.io/name`. */}}
{{- define "restic-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name: fullnameOverride, else the release name, with the chart name
appended unless the release name contains it already ("restic-operator" stays
"restic-operator"). Room is left for the longest suffix ("-coordinator").
*/}}
{{- define "restic-operator.fullname" -}}
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

{{- define "restic-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "restic-operator.labels" -}}
helm.sh/chart: {{ include "restic-operator.chart" . }}
app.kubernetes.io/name: {{ include "restic-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: restic-operator
{{- end }}

{{/*
Selector labels of one component; call with (dict "ctx" $ "component" "agent"). The agent's
are also the coordinator's --agent-selector (see "restic-operator.agentSelector").
*/}}
{{- define "restic-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "restic-operator.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of one component's objects: the common ones plus the component. */}}
{{- define "restic-operator.componentLabels" -}}
{{ include "restic-operator.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Labels of one component's pods: no helm.sh/chart, so that a new chart version that changes
nothing in the pods does not restart them (restarting an agent stops its node's restic runs).
*/}}
{{- define "restic-operator.podLabels" -}}
{{ include "restic-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: restic-operator
{{- end }}

{{/*
The coordinator's --agent-selector: the agent pods' selector labels, instance included, so that
two releases never dial each other's agents.
*/}}
{{- define "restic-operator.agentSelector" -}}
{{- $labels := include "restic-operator.selectorLabels" (dict "ctx" . "component" "agent") | fromYaml }}
{{- $pairs := list }}
{{- range $k := keys $labels | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%s" $k (get $labels $k)) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{- define "restic-operator.coordinator.serviceAccountName" -}}
{{- if .Values.coordinator.serviceAccount.create }}
{{- default (printf "%s-coordinator" (include "restic-operator.fullname" .)) .Values.coordinator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.coordinator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "restic-operator.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (printf "%s-agent" (include "restic-operator.fullname" .)) .Values.agent.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference: registry/repository, then @digest when one is given, else :tag (default:
the chart's appVersion). Call with (dict "ctx" $ "image" .Values.agent.image).
*/}}
{{- define "restic-operator.image" -}}
{{- $repository := .image.repository }}
{{- with .ctx.Values.image.registry }}
{{- $repository = printf "%s/%s" (trimSuffix "/" .) $repository }}
{{- end }}
{{- if .image.digest }}
{{- printf "%s@%s" $repository .image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default .ctx.Chart.AppVersion .ctx.Values.image.tag) }}
{{- end }}
{{- end }}
