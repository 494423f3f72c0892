"""Static checks of the deployment files: infra/ and the README's storage and cluster sections.

Nothing here needs Docker, Kubernetes or AWS: the manifests are parsed as YAML, the Dockerfile as
text, and the properties the hardening relies on are asserted (token authentication, network
exposure, non-root read-only pods, a base image pinned by digest, no credentials in a job's
runtime_env). What the files do once applied is not tested here; infra/README.md says how to
check it on a real cluster.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
MANIFESTS = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]
# a RayJob has a generated name per run, so its NetworkPolicies live in a file applied once
POLICIES = {"kuberay/raycluster.yaml": "kuberay/raycluster.yaml", "kuberay/rayjob.yaml": "kuberay/rayjob-network.yaml"}
RAY_PORTS = (8265, 6379, 10001)  # dashboard + Jobs API, GCS, Ray Client
OPEN_CIDRS = {"0.0.0.0/0", "::/0"}


def _docs(rel: str) -> list[dict]:
    with open(INFRA / rel) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _ray_cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _ray_doc(rel: str) -> dict:
    (doc,) = [d for d in _docs(rel) if d.get("kind") in ("RayCluster", "RayJob")]
    return doc


def _pod_templates(rel: str) -> dict[str, dict]:
    """Every pod template of the manifest: the head, each worker group, a RayJob's submitter."""
    doc = _ray_doc(rel)
    spec = _ray_cluster_spec(doc)
    out = {"head": spec["headGroupSpec"]["template"]}
    for group in spec.get("workerGroupSpecs", []):
        out[f"worker:{group['groupName']}"] = group["template"]
    if doc["kind"] == "RayJob":
        assert "submitterPodTemplate" in doc["spec"], (
            "the RayJob must define submitterPodTemplate, or its submitter pod gets no securityContext")
        out["submitter"] = doc["spec"]["submitterPodTemplate"]
    return out


def _containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ---------------------------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("rel", MANIFESTS)
def test_kuberay_token_auth_on_every_ray_container(rel):
    spec = _ray_cluster_spec(_ray_doc(rel))
    auth = spec.get("authOptions") or {}
    assert auth.get("mode") == "token", f"{rel}: authOptions.mode must be token"
    secret = auth.get("secretName")
    assert secret, f"{rel}: authOptions.secretName must name the token secret (one token to give users)"
    for where, template in _pod_templates(rel).items():
        for c in _containers(template):
            env = _env(c)
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", (
                f"{rel} {where}/{c['name']}: RAY_AUTH_MODE=token missing")
            tok = env.get("RAY_AUTH_TOKEN")
            assert tok is not None, f"{rel} {where}/{c['name']}: RAY_AUTH_TOKEN missing"
            assert "value" not in tok, f"{rel} {where}/{c['name']}: literal token in the manifest"
            ref = tok["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (secret, "auth_token"), (
                f"{rel} {where}/{c['name']}: RAY_AUTH_TOKEN must come from {secret}/auth_token")
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
                assert "value" not in env.get(name, {}), f"{rel} {where}/{c['name']}: literal {name}"
    runtime_env = _ray_doc(rel)["spec"].get("runtimeEnvYAML", "")
    assert "AWS_" not in runtime_env, f"{rel}: credentials in runtimeEnvYAML (shown by `ray job list`)"


@pytest.mark.parametrize("rel", MANIFESTS)
def test_kuberay_security_context_on_every_container(rel):
    for where, template in _pod_templates(rel).items():
        pod_sc = template["spec"].get("securityContext") or {}
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        for c in _containers(template):
            sc = c.get("securityContext") or {}
            label = f"{rel} {where}/{c['name']}"

            def effective(key, sc=sc, pod_sc=pod_sc):
                return sc.get(key, pod_sc.get(key))

            assert effective("runAsNonRoot") is True, f"{label}: runAsNonRoot"
            uid = effective("runAsUser")
            assert isinstance(uid, int) and uid > 0, f"{label}: runAsUser must be a non-zero UID"
            assert sc.get("allowPrivilegeEscalation") is False, f"{label}: allowPrivilegeEscalation"
            assert "ALL" in (sc.get("capabilities") or {}).get("drop", []), f"{label}: drop ALL"
            assert (effective("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{label}: seccomp"
            assert sc.get("readOnlyRootFilesystem") is True, f"{label}: readOnlyRootFilesystem"
            assert not sc.get("privileged"), f"{label}: privileged"
            # Ray writes /tmp/ray: with a read-only root, /tmp must be a writable emptyDir.
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{label}: no volume at /tmp"
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{label}: /tmp must be an emptyDir"


def _selects(policy: dict, labels: dict) -> bool:
    sel = policy["spec"].get("podSelector") or {}
    assert not sel.get("matchExpressions"), "use matchLabels in these policies"
    return all(labels.get(k) == v for k, v in (sel.get("matchLabels") or {}).items())


def _admits_port(rule: dict, port: int) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True  # no ports listed: every port
    for p in ports:
        lo = p.get("port")
        if lo is None or isinstance(lo, str):  # no port, or a named one: assume it may be this one
            return True
        if lo <= port <= p.get("endPort", lo):
            return True
    return False


@pytest.mark.parametrize("rel", MANIFESTS)
def test_kuberay_head_ports_closed_by_networkpolicy(rel):
    docs = _docs(POLICIES[rel])
    spec = _ray_cluster_spec(_ray_doc(rel))
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{rel}: head service must stay ClusterIP"
    head_labels = dict((head["template"].get("metadata") or {}).get("labels") or {})
    head_labels["ray.io/node-type"] = "head"
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    on_head = [p for p in policies
               if _selects(p, head_labels) and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    assert on_head, f"{rel}: no NetworkPolicy selects the head pod, so every port is open to the network"

    submitters = 0
    for p in on_head:
        for rule in p["spec"].get("ingress", []):
            peers = rule.get("from")
            if not any(_admits_port(rule, port) for port in RAY_PORTS):
                continue
            assert peers, f"{rel} {p['metadata']['name']}: a rule without `from` admits every source"
            for peer in peers:
                block = peer.get("ipBlock")
                assert block is None or block["cidr"] not in OPEN_CIDRS, (
                    f"{rel} {p['metadata']['name']}: {block} opens the Ray ports to the internet")
                assert block is None or ipaddress.ip_network(block["cidr"]).is_private, (
                    f"{rel} {p['metadata']['name']}: {block} is not a private range")
                ns = peer.get("namespaceSelector")
                assert ns is None or (ns.get("matchLabels") or ns.get("matchExpressions")), (
                    f"{rel} {p['metadata']['name']}: namespaceSelector {{}} admits every namespace")
                pod = peer.get("podSelector")
                assert ns is not None or block is not None or (pod and pod.get("matchLabels")), (
                    f"{rel} {p['metadata']['name']}: podSelector {{}} admits every pod of the namespace")
                # A client named by its namespace, or by a label that is not the cluster's own.
                names_ns = "kubernetes.io/metadata.name" in ((ns or {}).get("matchLabels") or {})
                client_label = any(head_labels.get(k) != v
                                   for k, v in ((pod or {}).get("matchLabels") or {}).items())
                if _admits_port(rule, 8265) and (names_ns or client_label):
                    submitters += 1
    assert submitters, f"{rel}: nothing named (namespace or label) may reach the Jobs API on 8265"


def test_kuberay_rayjob_generated_name_and_policies_apart():
    """`kubectl create -f rayjob.yaml` twice gives two jobs: a generated name, and nothing else in
    the file (fixed-name objects would collide on the second create)."""
    docs = _docs("kuberay/rayjob.yaml")
    assert [d["kind"] for d in docs] == ["RayJob"]
    meta = docs[0]["metadata"]
    assert "name" not in meta and meta.get("generateName", "").endswith("-")
    assert {d["kind"] for d in _docs(POLICIES["kuberay/rayjob.yaml"])} == {"NetworkPolicy"}
    for text in ((INFRA / "README.md").read_text(), (REPO / "README.md").read_text()):
        assert "kubectl apply -f infra/kuberay/rayjob.yaml" not in text
    assert "kubectl create -f infra/kuberay/rayjob.yaml" in (INFRA / "README.md").read_text()


@pytest.mark.parametrize("rel", MANIFESTS)
def test_kuberay_autoscaling_gpu_tolerations_logs_and_prestop(rel):
    spec = _ray_cluster_spec(_ray_doc(rel))
    groups = spec["workerGroupSpecs"]
    if any("minReplicas" in g or "maxReplicas" in g for g in groups):
        assert spec.get("enableInTreeAutoscaling") is True, f"{rel}: min/maxReplicas without the autoscaler"
        for g in groups:
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{rel} {g['groupName']}: replicas"
        # the sidecar is a container of the head too: token auth, hardening, a writable /tmp
        auto = spec["autoscalerOptions"]
        sc, env = auto["securityContext"], {e["name"]: e for e in auto["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "valueFrom" in env["RAY_AUTH_TOKEN"], rel
        assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False, rel
        assert "/tmp" in {m["mountPath"] for m in auto["volumeMounts"]}, rel
        head_volumes = {v["name"] for v in spec["headGroupSpec"]["template"]["spec"]["volumes"]}
        assert {m["name"] for m in auto["volumeMounts"]} <= head_volumes, f"{rel}: autoscaler mounts a missing volume"
    for where, template in _pod_templates(rel).items():
        if where == "submitter":
            continue
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        gpus = any("nvidia.com/gpu" in (c.get("resources") or {}).get("limits", {}) for c in _containers(template))
        tolerated = {t.get("key") for t in pod.get("tolerations", []) if t.get("effect") in (None, "NoSchedule")}
        assert not gpus or "nvidia.com/gpu" in tolerated, f"{rel} {where}: GPU pods must tolerate the nvidia.com/gpu taint"
        for c in _containers(template):
            label = f"{rel} {where}/{c['name']}"
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "/tmp/ray" in mounts and "emptyDir" in volumes[mounts["/tmp/ray"]], f"{label}: no log volume at /tmp/ray"
            command = c["lifecycle"]["preStop"]["exec"]["command"]
            assert command[-1] == "ray stop", f"{label}: preStop must run `ray stop`"


# ---------------------------------------------------------------------------------- launcher


def _launcher() -> dict:
    return yaml.safe_load((INFRA / "cluster.yaml").read_text())


def test_launcher_security_group_keeps_ray_ports_in_the_vpc():
    cfg = _launcher()
    rules = ((cfg["provider"].get("security_group") or {}).get("IpPermissions")) or []
    assert rules, "provider.security_group.IpPermissions must restrict the Ray ports"
    for port in RAY_PORTS:
        covering = [r for r in rules
                    if r.get("IpProtocol") in ("tcp", "-1")
                    and (r.get("IpProtocol") == "-1" or r["FromPort"] <= port <= r["ToPort"])]
        assert covering, f"no security-group rule for port {port}"
        for r in covering:
            cidrs = [x["CidrIp"] for x in r.get("IpRanges", [])]
            cidrs += [x["CidrIpv6"] for x in r.get("Ipv6Ranges", [])]
            assert cidrs or r.get("UserIdGroupPairs"), f"port {port}: rule without a source"
            for cidr in cidrs:
                assert cidr not in OPEN_CIDRS, f"port {port} open to the internet ({cidr})"
                assert ipaddress.ip_network(cidr).is_private, f"port {port}: {cidr} is not a VPC range"


def test_launcher_token_auth_on_every_node():
    cfg = _launcher()
    run_options = " ".join((cfg.get("docker") or {}).get("run_options", []))
    in_container_env = re.search(r"(--env|-e)[ =]RAY_AUTH_MODE=token\b", run_options) is not None
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts, key
        for cmd in starts:
            assert in_container_env or "RAY_AUTH_MODE=token" in cmd, f"{key}: `{cmd}` starts Ray without token auth"
    mounts = cfg.get("file_mounts") or {}
    assert any(remote.endswith(".ray/auth_token") or "RAY_AUTH_TOKEN" in remote for remote in mounts), (
        "the token must reach every node (file_mounts of ~/.ray/auth_token)")
    text = (INFRA / "cluster.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "AWS_ACCESS_KEY_ID" not in text


# ---------------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[str]:
    """Instructions of infra/Dockerfile, continuation lines joined, comments dropped."""
    lines, buf = [], ""
    for raw in (INFRA / "Dockerfile").read_text().splitlines():
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        lines.append((buf + s).strip())
        buf = ""
    return lines


def test_dockerfile_runs_as_non_root():
    users = [ln.split(None, 1)[1].strip() for ln in _dockerfile() if ln.upper().startswith("USER ")]
    assert users, "no USER: the image runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"final USER is {users[-1]}"


def test_dockerfile_base_image_pinned_by_digest():
    instructions = _dockerfile()
    required_args = set()
    stages = set()
    froms = 0
    for ln in instructions:
        word, _, rest = ln.partition(" ")
        word = word.upper()
        if word == "ARG" and froms == 0:
            name, eq, _default = rest.strip().partition("=")
            if not eq:
                required_args.add(name.strip())
        if word != "FROM":
            continue
        froms += 1
        parts = [p for p in rest.split() if not p.startswith("--")]
        image = parts[0]
        if len(parts) >= 3 and parts[1].upper() == "AS":
            stages.add(parts[2])
        if image in stages or image == "scratch":
            continue
        m = re.fullmatch(r"[^@\s]+@(.+)", image)
        assert m, f"FROM {image}: not pinned by digest"
        digest = m.group(1)
        if re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            assert not re.fullmatch(r"sha256:(.)\1{63}", digest), f"FROM {image}: a placeholder digest"
            continue
        # Or a build arg the build cannot do without: ${NAME:?message}, NAME declared with no default.
        m = re.fullmatch(r"\$\{(\w+):?\?[^}\s]+\}", digest)
        assert m, f"FROM {image}: digest is neither sha256:<64 hex> nor a required build arg ${{NAME:?msg}}"
        assert m.group(1) in required_args, f"{m.group(1)} must be an ARG without a default before FROM"
    assert froms, "no FROM"


# ---------------------------------------------------------------------------------- README


def _readme_section(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    level = heading.split(" ")[0]
    m = re.search(rf"^{re.escape(heading)}\s*$", text, re.M)
    assert m, f"README has no section {heading!r}"
    rest = text[m.end():]
    end = re.search(rf"^#{{1,{len(level)}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def test_readme_credentials_never_in_runtime_env():
    storage = _readme_section("### Object storage")
    clusters = _readme_section("## Clusters")
    both = storage + "\n" + clusters
    fence = re.compile(r"^```.*?^```", re.M | re.S)
    for block in fence.findall(both):
        assert not (re.search(r"runtime.env|env_vars", block) and "AWS_" in block), (
            f"README example passes AWS settings through a job's runtime_env:\n{block}")
    # A job's runtime_env is shown by `ray job list` and the dashboard: the prose may only
    # mention it to forbid it.
    for sentence in re.split(r"(?<=[.!?:])\s+", fence.sub(" ", both)):
        if re.search(r"runtime.env", sentence):
            assert re.search(r"\b(never|not|no)\b", sentence, re.I), (
                f"README suggests runtime_env for settings: {' '.join(sentence.split())!r}")
    for needle in ("instance profile", "IRSA", "envFrom"):
        assert needle in both, f"README's storage/cluster sections must say where credentials come from: {needle}"
    assert "RAY_AUTH_TOKEN" in clusters and "RAY_AUTH_MODE=token" in clusters, (
        "README's Clusters section must say how to submit with the token")
