{{- define "ambit.labels" -}}
app.kubernetes.io/part-of: ambit
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{- define "ambit.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end }}

{{- define "ambit.plane" -}}
ambit-mgmt.{{ .Release.Namespace }}.svc
{{- end }}

{{- define "ambit.rootCert" -}}
{{ required "ca.rootCert: the PEM of the CA Secret's root-cert.pem (--set-file ca.rootCert=root-cert.pem)" .Values.ca.rootCert }}
{{- end }}
