{{/* Names and labels shared by every resource. */}}
{{- define "llmpipe.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "llmpipe.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "llmpipe.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "llmpipe.secretName" -}}
{{- .Values.existingSecret | default (printf "%s-secrets" (include "llmpipe.fullname" .)) -}}
{{- end -}}

{{/* The settings every llmpipe container reads: ConfigMap, then Secret. */}}
{{- define "llmpipe.envFrom" -}}
- configMapRef:
    name: {{ include "llmpipe.fullname" . }}-settings
{{- if or .Values.existingSecret .Values.secrets }}
- secretRef:
    name: {{ include "llmpipe.secretName" . }}
{{- end }}
{{- end -}}

{{/* Pod name and namespace on every span and metric (service.instance.id stays per process). */}}
{{- define "llmpipe.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef: {fieldPath: metadata.name}
- name: POD_NAMESPACE
  valueFrom:
    fieldRef: {fieldPath: metadata.namespace}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)
{{- end -}}

{{/* The image runs as an unprivileged user; nothing in the pod needs more. */}}
{{- define "llmpipe.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "llmpipe.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: {drop: [ALL]}
{{- end -}}

{{/* A stage's input topic and consumer group, from files/stages.yaml (the topology). */}}
{{- define "llmpipe.stageTopic" -}}
{{- $stages := .root.Files.Get "files/stages.yaml" | fromYaml -}}
{{- $topic := get $stages .stage -}}
{{- if not $topic -}}
{{- fail (printf "unknown stage %q in workers.groups; the stages are: %s" .stage (keys $stages | sortAlpha | join ", ")) -}}
{{- end -}}
{{- printf "%s%s" .root.Values.topicPrefix $topic -}}
{{- end -}}

{{- define "llmpipe.stageGroup" -}}
{{- printf "%sllmpipe.%s" .root.Values.topicPrefix .stage -}}
{{- end -}}
