from tests.unit.translate.probe import HCM_AT

ROOTS = [
  ("envoy.config.bootstrap.v3.Bootstrap", "", []),
  ("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", HCM_AT, []),
  ("envoy.extensions.filters.http.router.v3.Router", HCM_AT+".http_filters[4].typed_config", []),
  ("envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication", HCM_AT+".http_filters[0].typed_config", []),
  ("envoy.extensions.filters.http.rbac.v3.Rbac", HCM_AT+".http_filters[1].typed_config", []),
  ("envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit", HCM_AT+".http_filters[2].typed_config", []),
  ("envoy.extensions.filters.http.fault.v3.HttpFault", HCM_AT+".http_filters[3].typed_config", []),
  ("envoy.extensions.access_loggers.file.v3.FileAccessLog", HCM_AT+".access_log[0].typed_config", []),
]
