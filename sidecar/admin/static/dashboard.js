// sidecar live dashboard: polls /dashboard.json once a second and renders it. No dependencies.
"use strict";
(function () {
  var POLL_MS = 1000;
  function $(id) { return document.getElementById(id); }
  function esc(s) {
    return String(s == null ? "" : s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }
  function fmtRate(v) { return v == null ? "–" : (v >= 100 ? v.toFixed(0) : v.toFixed(1)); }
  function fmtMs(v) {
    if (v == null) return "–";
    if (v < 1) return v.toFixed(2) + " ms";
    if (v < 100) return v.toFixed(1) + " ms";
    if (v < 10000) return v.toFixed(0) + " ms";
    return (v / 1000).toFixed(1) + " s";
  }
  function fmtPct(v) { return v == null ? "–" : (v * 100).toFixed(v >= 0.9995 || v === 0 ? 0 : 2) + "%"; }
  function pctClass(v) { return v == null ? "" : v >= 0.99 ? "good" : v >= 0.95 ? "meh" : "poor"; }
  function fmtDur(s) {
    s = Math.floor(s);
    var d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
    return d ? d + "d " + h + "h" : h ? h + "h " + m + "m" : m ? m + "m " + (s % 60) + "s" : s + "s";
  }
  function spark(values) {
    var w = 120, h = 22;
    if (!values || values.length < 2) return '<svg class="spark" width="' + w + '" height="' + h + '"></svg>';
    var max = Math.max.apply(null, values.concat([1e-9]));
    var step = w / (values.length - 1), pts = [];
    for (var i = 0; i < values.length; i++) {
      pts.push((i * step).toFixed(1) + "," + (h - 2 - (values[i] / max) * (h - 4)).toFixed(1));
    }
    return '<svg class="spark" width="' + w + '" height="' + h + '"><polyline points="' + pts.join(" ") + '"/></svg>';
  }
  function healthPill(ep) {
    var cls = ep.health === "healthy" ? "ok" : ep.health === "ejected" ? "warn" : "bad";
    var text = ep.health + (ep.ejected ? " (" + ep.ejected_for_s + "s)" : "");
    return '<span class="pill ' + cls + '" data-health="' + esc(ep.health) + '">' + esc(text) + "</span>";
  }

  function renderRoutes(d) {
    var body = $("routes").tBodies[0];
    if (!d.routes.length) { body.innerHTML = '<tr><td colspan="8" class="dim">no traffic yet</td></tr>'; return; }
    var rows = d.routes.map(function (r) {
      return '<tr data-route="' + esc(r.route) + '">' +
        '<td class="route-name"><b>' + esc(r.route) + "</b></td>" +
        '<td class="dim">' + esc(r.listener) + (r.virtual_host ? " / " + esc(r.virtual_host) : "") + "</td>" +
        '<td class="num route-rps">' + fmtRate(r.rps) + "</td>" +
        "<td>" + spark(r.history) + "</td>" +
        '<td class="num route-success ' + pctClass(r.success_rate) + '">' + fmtPct(r.success_rate) + "</td>" +
        '<td class="num">' + fmtMs(r.p50_ms) + "</td>" +
        '<td class="num route-p99">' + fmtMs(r.p99_ms) + "</td>" +
        '<td class="num route-requests">' + r.requests + "</td></tr>";
    });
    body.innerHTML = rows.join("");
  }

  function renderClusters(d) {
    var box = $("clusters");
    if (!d.clusters.length) { box.innerHTML = '<p class="dim">no clusters</p>'; return; }
    box.innerHTML = d.clusters.map(function (c) {
      var br = c.breaker.open.length
        ? '<span class="pill bad breaker" data-breaker="open">breaker open: ' + esc(c.breaker.open.join(", ")) + "</span>"
        : '<span class="pill ok breaker" data-breaker="closed">breaker closed</span>';
      var eps = c.endpoints.map(function (e) {
        return '<tr data-endpoint="' + esc(e.address) + '"><td class="ep-address">' + esc(e.address) +
          (e.hostname ? ' <span class="dim">' + esc(e.hostname) + "</span>" : "") + "</td>" +
          "<td>" + healthPill(e) + "</td>" +
          '<td class="num ep-ewma">' + fmtMs(e.ewma_ms) + "</td>" +
          '<td class="num">' + e.rq_active + "</td>" +
          '<td class="num ep-requests">' + e.rq_total + "</td>" +
          '<td class="num">' + e.rq_error + "</td>" +
          '<td class="num">' + e.ejections + "</td>" +
          '<td class="num">' + e.cx_active + "</td></tr>";
      }).join("");
      return '<div class="cluster" data-cluster="' + esc(c.name) + '"><div class="cluster-head">' +
        '<h3 class="cluster-name">' + esc(c.name) + "</h3>" +
        '<span class="kv">' + esc(c.lb_policy) + "</span>" +
        '<span class="kv">req/s <b class="cluster-rps">' + fmtRate(c.rps) + "</b></span>" +
        spark(c.history) +
        '<span class="kv">success <b class="cluster-success ' + pctClass(c.success_rate) + '">' + fmtPct(c.success_rate) + "</b></span>" +
        '<span class="kv">p50 <b>' + fmtMs(c.p50_ms) + '</b></span><span class="kv">p99 <b>' + fmtMs(c.p99_ms) + "</b></span>" +
        '<span class="kv">active <b>' + c.rq_active + '</b></span><span class="kv">pending <b>' + c.rq_pending + "</b></span>" +
        '<span class="kv">retries <b>' + c.retries + '</b></span><span class="kv">timeouts <b>' + c.timeouts + "</b></span>" +
        '<span class="kv">endpoints <b>' + c.endpoints_available + "/" + c.endpoints_total + "</b></span>" + br +
        "</div><table><thead><tr><th>endpoint</th><th>health</th><th class=\"num\">EWMA</th>" +
        '<th class="num">active</th><th class="num">requests</th><th class="num">errors</th>' +
        '<th class="num">ejections</th><th class="num">conns</th></tr></thead><tbody>' +
        (eps || '<tr><td colspan="8" class="dim">no endpoints</td></tr>') + "</tbody></table></div>";
    }).join("");
  }

  function clock(t) {
    return t ? new Date(t * 1000).toLocaleTimeString([], { hour12: false }) : "";
  }

  // Redis stores and rate limit services: a down one means its filters answer by policy
  function renderDependencies(d) {
    var deps = d.dependencies || [];
    $("dependencies-section").hidden = !deps.length;
    $("dependencies").tBodies[0].innerHTML = deps.map(function (x) {
      var state = x.up
        ? '<span class="pill ok dep-state" data-state="up">up</span>'
        : '<span class="pill bad dep-state" data-state="down">down' +
          (x.since ? " since " + esc(clock(x.since)) : "") + "</span>";
      if (x.warning) state += ' <span class="pill warn" title="' + esc(x.warning) + '">warning</span>';
      var err = x.last_error
        ? esc(x.last_error) + ' <span class="dim">' + esc(clock(x.last_error_at)) + "</span>" : "";
      return '<tr data-dependency="' + esc(x.name) + '"><td><b>' + esc(x.name) + "</b></td>" +
        '<td class="dim">' + esc(x.address) + "</td><td>" + state + "</td>" +
        '<td class="num dep-calls">' + x.calls + '</td><td class="num dep-failures">' + x.failures +
        '</td><td class="num">' + x.timeouts + '</td><td class="num">' + x.skipped + "</td>" +
        '<td class="num dep-fail-open">' + x.fail_open + '</td><td class="num dep-fail-closed">' +
        x.fail_closed + '</td><td class="dep-error">' + err + "</td></tr>";
    }).join("");
  }

  function fmtBytes(v) {
    if (v == null) return "–";
    var u = ["B", "kB", "MB", "GB", "TB"], i = 0;
    while (v >= 1000 && i < u.length - 1) { v /= 1000; i++; }
    return (i ? v.toFixed(1) : v.toFixed(0)) + " " + u[i];
  }

  function renderL4(d) {
    var tcp = d.tcp || [], kafka = d.kafka || [];
    $("l4").hidden = !tcp.length && !kafka.length;
    $("tcp").tBodies[0].innerHTML = tcp.map(function (t) {
      return '<tr data-tcp="' + esc(t.stat_prefix) + '"><td><b>' + esc(t.stat_prefix) + "</b></td>" +
        '<td class="num tcp-open">' + t.cx_active + "</td>" +
        '<td class="num">' + fmtRate(t.cx_per_s) + "</td>" +
        '<td class="num">' + fmtBytes(t.rx_bytes_per_s) + "</td>" +
        '<td class="num">' + fmtBytes(t.tx_bytes_per_s) + "</td>" +
        '<td class="num tcp-total">' + t.cx_total + "</td>" +
        '<td class="num">' + fmtBytes(t.rx_bytes) + "</td>" +
        '<td class="num">' + fmtBytes(t.tx_bytes) + "</td></tr>";
    }).join("") || '<tr><td colspan="8" class="dim">no TCP proxy traffic yet</td></tr>';
    $("kafka").innerHTML = kafka.map(function (k) {
      var apis = k.apis.slice(0, 8).map(function (a) {
        return '<span class="kv">' + esc(a.api) + " <b>" + fmtRate(a.per_s) + "/s</b></span>";
      }).join("");
      var errs = Object.keys(k.errors).map(function (e) {
        return '<span class="pill bad">' + esc(e) + " " + k.errors[e] + "</span>";
      }).join(" ");
      var topics = k.topics.map(function (t) {
        return '<tr data-topic="' + esc(t.topic) + '"><td class="topic-name"><b>' + esc(t.topic) + "</b></td>" +
          '<td class="num">' + fmtRate(t.produce_records_per_s) + "</td>" +
          '<td class="num">' + fmtBytes(t.produce_bytes_per_s) + "</td>" +
          '<td class="num">' + fmtRate(t.fetch_records_per_s) + "</td>" +
          '<td class="num">' + fmtBytes(t.fetch_bytes_per_s) + "</td>" +
          '<td class="num topic-produced">' + (t.produce_records || 0) + "</td>" +
          '<td class="num topic-fetched">' + (t.fetch_records || 0) + "</td>" +
          '<td class="num topic-denied">' + ((t.produce_denied || 0) + (t.fetch_denied || 0)) + "</td></tr>";
      }).join("");
      return '<div class="cluster" data-kafka="' + esc(k.stat_prefix) + '"><div class="cluster-head">' +
        "<h3>Kafka " + esc(k.stat_prefix) + "</h3>" +
        '<span class="kv">requests/s <b>' + fmtRate(k.requests_per_s) + "</b></span>" + apis + " " + errs +
        "</div><table><thead><tr><th>topic</th><th class=\"num\">produced rec/s</th>" +
        '<th class="num">produced /s</th><th class="num">fetched rec/s</th><th class="num">fetched /s</th>' +
        '<th class="num">produced</th><th class="num">fetched</th><th class="num">denied</th></tr></thead><tbody>' +
        (topics || '<tr><td colspan="8" class="dim">no records yet</td></tr>') + "</tbody></table></div>";
    }).join("");
  }

  function render(d) {
    $("config-version").textContent = d.config.version == null ? "–" : d.config.version;
    $("config-updates").textContent = d.config.accepted + " ok / " + d.config.rejected + " refused";
    var ce = $("config-error");
    if (d.config.last_error) { ce.hidden = false; ce.textContent = "last refused update: " + d.config.last_error; }
    else { ce.hidden = true; }
    $("tracing").textContent = d.tracing && d.tracing.active
      ? d.tracing.exporter + " @ " + d.tracing.sample_percent + "%" : "off";
    $("uptime").textContent = fmtDur(d.uptime_s);
    $("metrics-off").hidden = d.metrics_enabled;
    $("total-rps").textContent = fmtRate(d.totals.rps);
    var ts = $("total-success");
    ts.textContent = fmtPct(d.totals.success_rate);
    ts.className = "big " + pctClass(d.totals.success_rate);
    $("total-requests").textContent = d.totals.requests;
    $("listeners").innerHTML = d.listeners.map(function (l) {
      var chains = (l.chains || []).map(function (c) { return c.name + " (" + c.kind + ")"; }).join(", ");
      return "<div><b>" + esc(l.name) + "</b> " + esc(l.address) + ' <span class="dim">' +
        l.cx_active + " conns, " + l.rq_active + " active" + (chains ? "; " + esc(chains) : "") +
        "</span></div>";
    }).join("") || "–";
    $("window").textContent = d.window_s ? "(last " + Math.round(d.window_s) + " s)" : "";
    renderDependencies(d);
    renderRoutes(d);
    renderL4(d);
    renderClusters(d);
  }

  function poll() {
    fetch("/dashboard.json", { cache: "no-store" })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (d) {
        render(d);
        var s = $("status");
        s.className = "pill ok"; s.textContent = "live";
        document.body.setAttribute("data-updated", String(d.time));
      })
      .catch(function (e) {
        var s = $("status");
        s.className = "pill bad"; s.textContent = "disconnected";
      })
      .then(function () { setTimeout(poll, POLL_MS); });
  }
  poll();
})();
