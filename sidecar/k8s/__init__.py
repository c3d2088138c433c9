"""Kubernetes integration: sidecar injection (admission webhook and offline), the application
probes served by the injected sidecar, and (issue 16) the interception init step.

``settings``      injector defaults and per-pod annotations, parsed and validated
``probe_rewrite`` the app probes moved behind the sidecar's probe port (pure)
``inject``        a pod (or pod template) -> the injected pod, or a refusal with its reason
``manifests``     offline injection of multi-document YAML (workload kinds -> pod templates)
``webhook``       the mutating admission webhook (AdmissionReview v1 -> JSONPatch) over HTTPS
``probes``        the sidecar-side prober: /app-health/<container>/<kind> and /healthz/*
``cli``           ``sidecar inject [-f FILE] | sidecar inject serve``
"""
