"""Static checks of the cluster files: launcher configs, KubeRay manifests, image, recipes.

Nothing here talks to a cloud or a Kubernetes API. Each check is a function returning the list
of problems it found, so that the negative tests at the end can show, on a broken copy, that
the check does flag what it is meant to flag.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import torch
import yaml
from ray.autoscaler._private.util import fillout_defaults, merge_setup_commands, validate_config

from ssl_dist.config import load_config
from ssl_dist.dist.zero import check_supported
from ssl_dist.models.encoders import build_encoder

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
K8S = CLUSTER / "k8s"
LAUNCHER_FILES = sorted(CLUSTER.glob("*.yaml"))
K8S_FILES = sorted(K8S.glob("*.yaml"))
RECIPES = {
    "imagenet-simclr-r50.yaml": ("simclr", "resnet50"),
    "imagenet-mocov3-vits.yaml": ("moco_v3", "vit_small"),
    "dino-vit-small.yaml": ("dino", "vit_small"),
    "mae-vit-small.yaml": ("mae", "vit_small"),
}
GLOBAL_BATCH = 4096
BATCHES = {"dino-vit-small.yaml": 1024}
"""Global batches other than GLOBAL_BATCH (DINO's ViT-S/16: 1024)."""
IMAGENET_STEPS = 1281167 // 1024
"""Optimizer steps per ImageNet-1k epoch at a global batch of 1024."""
PRIVATE_PORTS = (8265, 10001, 6379)
OPEN_WORLD = {"0.0.0.0/0", "::/0"}
IMAGE_ROOT = "/opt/ssl-dist"
"""Where cluster/Dockerfile puts the repository's files; RayJob config paths live under it."""


def _schema() -> dict[str, Any]:
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a mapping"
    return data


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# ----------------------------------------------------------------------------------------------
# Ray cluster launcher configs
# ----------------------------------------------------------------------------------------------


def _gpu_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        k: v
        for k, v in cfg.get("available_node_types", {}).items()
        if v.get("resources", {}).get("GPU", 0) > 0
    }


def _all_setup(cfg: dict[str, Any]) -> list[str]:
    cmds = list(cfg.get("setup_commands", []))
    cmds += cfg.get("head_setup_commands", []) + cfg.get("worker_setup_commands", [])
    return [str(c) for c in cmds]


def _rule_opens(rule: dict[str, Any], port: int) -> bool:
    if str(rule.get("IpProtocol")) == "-1":
        return True
    lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
    return lo == -1 or lo <= port <= hi


def _uses_lock(command: str) -> bool:
    """Whether a pip / uv pip install command installs under the project's lock."""
    return re.search(r"(^|\s)(-c|--constraints?)[ =]\S*constraints\.txt", command) is not None


def launcher_problems(cfg: dict[str, Any]) -> list[str]:
    """Everything the design relies on in a cluster-launcher config."""
    out: list[str] = []
    try:
        jsonschema.validate(cfg, _schema())
    except jsonschema.ValidationError as e:
        out.append(f"schema: {e.message} at {list(e.absolute_path)}")
    try:
        full = fillout_defaults(copy.deepcopy(cfg))
        merge_setup_commands(full)
        validate_config(full)
    except Exception as e:  # Ray's own checks beyond the schema
        out.append(f"ray validate_config: {e}")

    types = cfg.get("available_node_types", {})
    head = cfg.get("head_node_type")
    if head not in types:
        out.append(f"head_node_type {head!r} is not one of {sorted(types)}")
    elif types[head].get("resources", {}).get("GPU", 0):
        out.append("the head node type has GPUs")
    gpus = _gpu_types(cfg)
    if not gpus:
        out.append("no node type with GPU resources")
    for name, t in gpus.items():
        lo, hi = t.get("min_workers", 0), t.get("max_workers")
        if hi is None or not 0 <= lo <= hi or hi < 1:
            out.append(f"{name}: needs 0 <= min_workers <= max_workers, max >= 1 ({lo}, {hi})")
        nc = t.get("node_config", {})
        spot = (
            nc.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
            or nc.get("scheduling", {}).get("provisioningModel") == "SPOT"
            or nc.get("scheduling", {}).get("preemptible") is True
        )
        if not spot:
            out.append(f"{name}: GPU workers are not spot / preemptible")
    cpu_workers = [
        k
        for k, t in types.items()
        if k != head and t.get("resources", {}).get("CPU", 0) > 0 and k not in gpus
    ]
    if not cpu_workers:
        out.append("no CPU worker type for data / eval")
    if not cfg.get("idle_timeout_minutes"):
        out.append("idle_timeout_minutes is not set")

    setup = _all_setup(cfg)
    mounts = cfg.get("file_mounts", {}) or {}
    repo_mounts = [remote for remote, local in mounts.items() if str(local) in (".", "./")]
    installs = [
        c
        for c in setup
        if "pip install" in c
        and (any(m in c for m in repo_mounts) or re.search(r"ssl[-_]dist.*\.whl|ssl-dist @", c))
    ]
    if not installs:
        out.append("no setup command pip-installs the project (a mounted checkout or a wheel)")
    unlocked = [c for c in setup if "pip install" in c and not _uses_lock(c)]
    if unlocked:
        out.append(f"pip install without the lock (-c .../constraints.txt): {unlocked[0]!r}")

    starts = [str(c) for c in cfg.get("head_start_ray_commands", [])]
    wstarts = [str(c) for c in cfg.get("worker_start_ray_commands", [])]
    for label, cmds in (("head", starts), ("worker", wstarts)):
        if not any("ray start" in c and "RAY_AUTH_MODE=token" in c for c in cmds):
            out.append(f"{label} `ray start` does not run with RAY_AUTH_MODE=token")
    if not any(Path(str(r)).name == "auth_token" for r in mounts):
        out.append("the Ray auth token file is not mounted on the nodes")

    provider = cfg.get("provider", {})
    for rule in provider.get("security_group", {}).get("IpPermissions", []):
        world = {r.get("CidrIp") for r in rule.get("IpRanges", [])}
        world |= {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])}
        for port in PRIVATE_PORTS:
            if world & OPEN_WORLD and _rule_opens(rule, port):
                out.append(f"security_group opens {port} to the world")
    if provider.get("type") == "aws":
        # Ray's auto-created security group opens SSH to 0.0.0.0/0: every type must name ours.
        for k, t in types.items():
            if not t.get("node_config", {}).get("SecurityGroupIds"):
                out.append(f"{k}: no SecurityGroupIds (Ray's default group opens SSH to all)")
    if provider.get("type") == "gcp":
        for k, t in types.items():
            nics = t.get("node_config", {}).get("networkInterfaces", [])
            nets = [n.get("subnetwork", "") + n.get("network", "") for n in nics]
            if not nets or any(n.endswith("/default") or not n for n in nets):
                out.append(f"{k}: must use the ssl-dist subnetwork, not the default network")
    return out


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_config(path):
    assert launcher_problems(_load(path)) == []


def test_launcher_configs_exist():
    assert {p.name for p in LAUNCHER_FILES} >= {"aws.yaml", "gcp.yaml"}


def _firewall_problems(script: str) -> list[str]:
    """Ingress rules in the network scripts: only SSH from a non-world CIDR, or intra-cluster."""
    out: list[str] = []
    text = script.replace("\\\n", " ")
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    aws = [ln for ln in lines if "authorize-security-group-ingress" in ln]
    gcp = [ln for ln in lines if "firewall-rules create" in ln]
    if not aws and not gcp:
        out.append("no ingress rule found")
    for ln in aws:
        if "IpRanges" in ln or "Ipv6Ranges" in ln:
            if not re.search(r"FromPort=22,ToPort=22", ln):
                out.append(f"CIDR rule for a port other than SSH: {ln.strip()}")
            if "0.0.0.0/0" in ln or "::/0" in ln:
                out.append(f"rule open to the world: {ln.strip()}")
        elif "UserIdGroupPairs" not in ln:
            out.append(f"rule neither SSH-from-CIDR nor intra-group: {ln.strip()}")
    for ln in gcp:
        if "--source-ranges" in ln:
            if not re.search(r"--allow tcp:22(\s|$)", ln):
                out.append(f"CIDR rule for a port other than SSH: {ln.strip()}")
            if "0.0.0.0/0" in ln or "::/0" in ln:
                out.append(f"rule open to the world: {ln.strip()}")
        elif "--source-tags" not in ln:
            out.append(f"rule neither SSH-from-CIDR nor intra-cluster: {ln.strip()}")
    return out


@pytest.mark.parametrize("name", ["aws-security-group.sh", "gcp-network.sh"])
def test_network_scripts_open_only_ssh_from_admin_cidr(name):
    script = (CLUSTER / name).read_text()
    assert _firewall_problems(script) == []
    assert "ADMIN_CIDR" in script and "refusing" in script


# ----------------------------------------------------------------------------------------------
# KubeRay manifests
# ----------------------------------------------------------------------------------------------


def _all_k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in K8S_FILES for d in _docs(p)]


def _embedded_docs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Manifests carried as ConfigMap data (the retrain RayJob)."""
    if doc.get("kind") != "ConfigMap":
        return []
    out = []
    for value in (doc.get("data") or {}).values():
        out += [d for d in yaml.safe_load_all(value) if isinstance(d, dict) and "kind" in d]
    return out


def _rayjobs() -> list[dict[str, Any]]:
    docs = [d for _, d in _all_k8s_docs()]
    docs += [e for d in docs for e in _embedded_docs(d)]
    return [d for d in docs if d.get("kind") == "RayJob"]


def _cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = [
        (f"{n}:RayCluster", d["spec"]) for n, d in _all_k8s_docs() if d["kind"] == "RayCluster"
    ]
    specs += [(f"RayJob {_job_name(j)}", j["spec"]["rayClusterSpec"]) for j in _rayjobs()]
    return specs


def _job_name(job: dict[str, Any]) -> str:
    meta = job.get("metadata", {})
    return meta.get("name") or meta.get("generateName", "?")


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template.get("spec", {}).get("containers", [])


def _secret_env(container: dict[str, Any]) -> dict[str, str]:
    return {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def _gpus(container: dict[str, Any]) -> int:
    res = container.get("resources", {})
    return int(res.get("limits", {}).get("nvidia.com/gpu", 0))


def ray_cluster_spec_problems(spec: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if spec.get("enableInTreeAutoscaling") is not True:
        out.append("enableInTreeAutoscaling is not true")
    head = spec.get("headGroupSpec", {})
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        out.append(f"head service type {head.get('serviceType')!r} exposes the cluster")
    auth = spec.get("authOptions", {})
    if auth.get("mode") != "token":
        out.append("authOptions.mode is not token")
    containers = _containers(head.get("template", {}))
    groups = spec.get("workerGroupSpecs", [])
    gpu_groups = [g for g in groups if any(_gpus(c) for c in _containers(g["template"]))]
    if not gpu_groups:
        out.append("no GPU worker group")
    for g in groups:
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if lo is None or hi is None or not 0 <= lo <= hi or hi < 1:
            out.append(f"group {g.get('groupName')}: bad minReplicas/maxReplicas ({lo}, {hi})")
        containers += _containers(g["template"])
    token_in_env = all("RAY_AUTH_TOKEN" in _secret_env(c) for c in containers)
    if not auth.get("secretName") and not token_in_env:
        out.append("no Secret referenced for the Ray auth token")
    for c in containers:
        env = _secret_env(c)
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN"):
            if var not in env:
                out.append(f"container {c.get('name')}: {var} not from a Secret")
        if any("hostPort" in p for p in c.get("ports", [])):
            out.append(f"container {c.get('name')}: hostPort exposes a Ray port")
    return out


def test_k8s_manifests_parse_and_have_kinds():
    assert K8S_FILES, "no manifests in cluster/k8s"
    docs = _all_k8s_docs()
    for name, d in docs:
        assert d.get("apiVersion") and d.get("kind"), f"{name}: document without apiVersion/kind"
        if d["kind"] in ("RayCluster", "RayJob"):
            assert d["apiVersion"] == "ray.io/v1", name
    kinds = {d["kind"] for _, d in docs}
    assert kinds >= {"RayCluster", "RayJob", "CronJob", "ServiceAccount", "Role", "RoleBinding"}
    for name, d in docs:
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", name


def test_k8s_ray_cluster_specs():
    specs = _cluster_specs()
    assert len(specs) >= 3  # the RayCluster, the pretrain RayJob, the retrain RayJob
    for label, spec in specs:
        assert ray_cluster_spec_problems(spec) == [], label


def test_k8s_rayjobs_run_ssl_dist_with_recipes_in_the_image():
    jobs = _rayjobs()
    commands = set()
    for job in jobs:
        spec = job["spec"]
        assert spec.get("shutdownAfterJobFinishes") is True, _job_name(job)
        assert spec.get("ttlSecondsAfterFinished") is not None, _job_name(job)
        argv = shlex.split(spec["entrypoint"])
        if argv[:2] == ["bash", "-c"]:
            argv = shlex.split(argv[2])
        assert argv[0] == "ssl-dist", spec["entrypoint"]
        commands.add(argv[1])
        config = argv[argv.index("--config") + 1]
        assert config.startswith(IMAGE_ROOT + "/"), config
        assert (ROOT / config[len(IMAGE_ROOT) + 1 :]).is_file(), config
    assert commands == {"pretrain", "retrain"}


def test_k8s_cronjob_creates_the_retrain_rayjob():
    for path in K8S_FILES:
        docs = _docs(path)
        crons = [d for d in docs if d["kind"] == "CronJob"]
        if not crons:
            continue
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for d in docs:
            by_kind.setdefault(d["kind"], []).append(d)
        for cron in crons:
            assert cron["spec"]["concurrencyPolicy"] == "Forbid"
            pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            sa = pod["serviceAccountName"]
            assert sa in {d["metadata"]["name"] for d in by_kind["ServiceAccount"]}
            bindings = [
                b
                for b in by_kind["RoleBinding"]
                if any(s["kind"] == "ServiceAccount" and s["name"] == sa for s in b["subjects"])
            ]
            roles = {r["metadata"]["name"]: r for r in by_kind["Role"]}
            verbs = {
                v
                for b in bindings
                for rule in roles[b["roleRef"]["name"]]["rules"]
                if "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"]
                for v in rule["verbs"]
            }
            assert {"create", "get"} <= verbs
            # The container creates the RayJob from the mounted ConfigMap, by generated name.
            maps = {v["name"]: v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
            (container,) = pod["containers"]
            script = " ".join(container.get("command", []) + container.get("args", []))
            mounted = [
                (m["mountPath"], maps[m["name"]])
                for m in container["volumeMounts"]
                if m["name"] in maps
            ]
            assert mounted, "the RayJob ConfigMap is not mounted"
            configmaps = {d["metadata"]["name"]: d for d in by_kind["ConfigMap"]}
            created = [
                (cm, key)
                for mount, cm in mounted
                for key in configmaps[cm]["data"]
                if f"kubectl create -f {mount}/{key}" in script
            ]
            assert created, script
            for cm, key in created:
                (job,) = yaml.safe_load_all(configmaps[cm]["data"][key])
                assert job["kind"] == "RayJob"
                assert job["metadata"].get("generateName") and "name" not in job["metadata"]
            return
    pytest.fail("no CronJob in cluster/k8s")


def test_k8s_secrets_are_referenced_not_embedded():
    docs = _all_k8s_docs()
    assert not [n for n, d in docs if d["kind"] == "Secret"], "Secrets must not be committed"
    text = "\n".join(p.read_text() for p in K8S_FILES)
    assert "ssl-dist-ray-auth" in text and "ssl-dist-mlflow" in text


# ----------------------------------------------------------------------------------------------
# Image
# ----------------------------------------------------------------------------------------------


def dockerfile_problems(text: str) -> list[str]:
    out: list[str] = []
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    froms = [ln.split()[1] for ln in lines if ln.upper().startswith("FROM ")]
    if not froms or not froms[-1].startswith("python:3.11"):
        out.append(f"base image is not python:3.11 ({froms})")
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        out.append(f"does not end as a non-root USER ({users})")
    copies = " ".join(ln for ln in lines if ln.upper().startswith("COPY "))
    for part in ("pyproject.toml", "ssl_dist", "launch"):
        if part not in copies:
            out.append(f"does not COPY {part}")
    if not any(re.search(r"pip install (\S+ )*\.(\s|$)", ln) for ln in lines):
        out.append("does not pip install the project")
    installs = [c for ln in lines for c in ln.split("&&") if "pip install" in c]
    if "constraints.txt" not in copies:
        out.append("does not COPY the lock (constraints.txt)")
    for c in installs:
        if not _uses_lock(c):
            out.append(f"pip install without the lock: {c.strip()!r}")
    if not any(re.search(r"ray\[[^]]*default[^]]*\]", ln) for ln in lines):
        out.append("no ray[default] (dashboard and job server)")
    if f"WORKDIR {IMAGE_ROOT}" not in lines:
        out.append(f"project not at {IMAGE_ROOT}")
    return out


def test_dockerfile():
    assert dockerfile_problems((CLUSTER / "Dockerfile").read_text()) == []


# ----------------------------------------------------------------------------------------------
# Multi-node recipes
# ----------------------------------------------------------------------------------------------


def _max_workers(num_workers: int | tuple[int, int]) -> int:
    return num_workers if isinstance(num_workers, int) else num_workers[1]


PAPER = {
    # SimCLR (Chen et al. 2020, sec. 4, appendix B.1): LARS on plain data parallelism,
    # lr 0.3 x B/256, weight decay 1e-6, temperature 0.1, 100 epochs.
    "imagenet-simclr-r50.yaml": {
        "optimizer": "lars",
        "zero_stage": 0,
        "peak_lr": 4.8,
        "weight_decay": 1e-6,
        "temperature": 0.1,
        "epochs": 100,
    },
    # MoCo v3 ViT-S (Chen, Xie, He 2021): AdamW lr 1.5e-4 x B/256, weight decay 0.1,
    # temperature 0.2, momentum 0.99, 300 epochs; 12 heads, predictor ending in BN.
    "imagenet-mocov3-vits.yaml": {
        "optimizer": "adamw",
        "zero_stage": 2,
        "peak_lr": 2.4e-3,
        "weight_decay": 0.1,
        "temperature": 0.2,
        "epochs": 300,
        "momentum": 0.99,
        "vit_heads": 12,
        "pred_last_bn": True,
    },
    # DINO ViT-S/16 (Caron et al. 2021; facebookresearch/dino main_dino.py options): AdamW
    # lr 5e-4 x B/256, weight decay 0.04 (start of its schedule), student temperature 0.1,
    # teacher 0.04 -> 0.07 over 30 epochs, momentum 0.996, out_dim 65536, 2 x 224 + 10 x 96 crops.
    "dino-vit-small.yaml": {
        "optimizer": "adamw",
        "zero_stage": 2,
        "peak_lr": 2e-3,
        "weight_decay": 0.04,
        "temperature": 0.1,
        "epochs": 100,
        "momentum": 0.996,
        "teacher_temp": (0.04, 0.07, 30),
        "out_dim": 65536,
        "crops": (2, 224, 10, 96),
    },
    # MAE (He et al. 2021, appendix A.1): AdamW lr 1.5e-4 x B/256, betas 0.9 / 0.95, weight
    # decay 0.05, 40 warm-up epochs, mask ratio 0.75, decoder 512-d x 8 blocks (16 heads),
    # normalised pixel targets, 800 epochs; no colour augmentation.
    "mae-vit-small.yaml": {
        "optimizer": "adamw",
        "zero_stage": 2,
        "peak_lr": 2.4e-3,
        "weight_decay": 0.05,
        "epochs": 800,
        "betas": (0.9, 0.95),
        "warmup_epochs": 40,
        "masked": (0.75, 512, 8, 16, True),
        "colour": (0.0, 0.0, (0.0, 0.0), (0.0, 0.0)),
    },
}


def _paper_settings(cfg, batch: int = GLOBAL_BATCH) -> dict[str, Any]:
    from ssl_dist.optim import scaled_lr

    o = cfg.optim
    out = {
        "optimizer": o.name,
        "zero_stage": cfg.zero.stage,
        "peak_lr": round(scaled_lr(o.lr, batch, o.base_batch, o.lr_scaling), 10),
        "weight_decay": o.weight_decay,
        "temperature": cfg.method.temperature,
        "epochs": cfg.run.epochs,
    }
    if cfg.method.name == "moco_v3":
        out.update(
            momentum=cfg.method.momentum,
            vit_heads=cfg.model.vit_heads,
            pred_last_bn=cfg.model.pred_last_bn,
        )
    if cfg.method.name == "dino":
        d = cfg.method.dino
        out.update(
            temperature=d.student_temp,
            momentum=cfg.method.momentum,
            teacher_temp=(
                d.warmup_teacher_temp,
                d.teacher_temp,
                d.teacher_temp_warmup_steps / IMAGENET_STEPS,
            ),
            out_dim=d.out_dim,
            crops=(2, cfg.data.image_size, d.local_crops, d.local_size),
        )
    if cfg.method.name == "mae":
        m, v = cfg.method.masked, cfg.views
        del out["temperature"]  # not used
        out.update(
            betas=o.betas,
            warmup_epochs=o.warmup_steps / (1281167 // batch),  # full batches per epoch
            masked=(m.mask_ratio, m.decoder_dim, m.decoder_depth, m.decoder_heads, m.norm_pix_loss),
            colour=(v.jitter_p, v.grayscale_p, v.blur_p, v.solarize_p),
        )
    return out


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_imagenet_recipe(name):
    cfg = load_config(ROOT / "launch" / "recipes" / name)
    method, encoder = RECIPES[name]
    assert cfg.method.name == method and cfg.model.encoder == encoder
    workers = _max_workers(cfg.scaling.num_workers)
    batch = BATCHES.get(name, GLOBAL_BATCH)
    assert cfg.data.batch_size * workers * cfg.optim.grad_accum == batch
    assert cfg.zero.precision == "bf16"
    check_supported(cfg.zero, cfg.optim)  # no LARS under ZeRO 1-3
    assert PAPER[name] == _paper_settings(cfg, batch)
    assert cfg.data.manifest.startswith(("s3://", "gs://"))
    assert cfg.run.storage_path.startswith(("s3://", "gs://"))
    assert (cfg.tracking.uri or "").startswith(("http://", "https://"))
    assert cfg.scaling.use_gpu == "yes" and cfg.data.image_size == 224
    assert cfg.model.small_stem is False


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_imagenet_recipe_encoder_builds(name):
    cfg = load_config(ROOT / "launch" / "recipes" / name)
    with torch.device("meta"):  # shapes only: no memory, no init time
        enc = build_encoder(cfg.model, cfg.data.channels, cfg.data.image_size)
    assert enc.num_features == {"resnet50": 2048, "vit_small": 384}[cfg.model.encoder]


def _capacities() -> list[tuple[str, int, int]]:
    """(where, GPUs the autoscaler can reach, CPUs per GPU on a GPU node)."""
    caps = []
    for path in LAUNCHER_FILES:
        for name, t in _gpu_types(_load(path)).items():
            r = t["resources"]
            caps.append((f"{path.name}:{name}", t["max_workers"] * r["GPU"], r["CPU"] // r["GPU"]))
    for label, spec in _cluster_specs():
        for g in spec["workerGroupSpecs"]:
            for c in _containers(g["template"]):
                if _gpus(c):
                    cpu = int(c["resources"]["limits"]["cpu"])
                    caps.append(
                        (f"{label}:{g['groupName']}", g["maxReplicas"] * _gpus(c), cpu // _gpus(c))
                    )
    return caps


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_fit_the_clusters(name):
    cfg = load_config(ROOT / "launch" / "recipes" / name)
    caps = _capacities()
    assert len(caps) >= 5  # aws, gcp, RayCluster, two RayJobs
    for where, gpus, cpus_per_gpu in caps:
        assert _max_workers(cfg.scaling.num_workers) <= gpus, where
        assert cfg.scaling.cpus_per_worker <= cpus_per_gpu, where


# ----------------------------------------------------------------------------------------------
# The checks catch what they are meant to catch
# ----------------------------------------------------------------------------------------------


def _aws() -> dict[str, Any]:
    return _load(CLUSTER / "aws.yaml")


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda c: c.update(unknown_key=1), "schema"),
        (lambda c: c.update(head_node_type="nope"), "head_node_type"),
        (lambda c: c["available_node_types"]["worker.gpu"].update(min_workers=9), "min_workers"),
        (lambda c: c["available_node_types"]["worker.gpu"]["resources"].pop("GPU"), "GPU"),
        (lambda c: c.pop("idle_timeout_minutes"), "idle_timeout_minutes"),
        (lambda c: c.update(setup_commands=["echo hi"]), "pip-installs"),
        (lambda c: c.update(setup_commands=["pip install ~/ssl-dist"]), "without the lock"),
        (lambda c: c.update(head_start_ray_commands=["ray start --head"]), "RAY_AUTH_MODE"),
        (
            lambda c: c["provider"].update(
                security_group={
                    "GroupName": "x",
                    "IpPermissions": [
                        {
                            "IpProtocol": "tcp",
                            "FromPort": 8265,
                            "ToPort": 8265,
                            "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
                        }
                    ],
                }
            ),
            "opens 8265",
        ),
        (
            lambda c: c["available_node_types"]["worker.cpu"]["node_config"].pop(
                "SecurityGroupIds"
            ),
            "SecurityGroupIds",
        ),
    ],
)
def test_launcher_check_flags_broken_config(mutate, needle):
    cfg = _aws()
    mutate(cfg)
    problems = launcher_problems(cfg)
    assert any(needle in p for p in problems), problems


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda s: s.update(enableInTreeAutoscaling=False), "enableInTreeAutoscaling"),
        (lambda s: s["headGroupSpec"].update(serviceType="LoadBalancer"), "exposes"),
        (lambda s: s["workerGroupSpecs"][0].update(minReplicas=5), "minReplicas"),
        (lambda s: s.pop("authOptions"), "token"),
        (
            lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("env"),
            "MLFLOW_TRACKING_TOKEN",
        ),
    ],
)
def test_ray_cluster_check_flags_broken_spec(mutate, needle):
    spec = copy.deepcopy(_docs(K8S / "raycluster.yaml")[0]["spec"])
    mutate(spec)
    problems = ray_cluster_spec_problems(spec)
    assert any(needle in p for p in problems), problems


def test_other_checks_flag_broken_files():
    docker = (CLUSTER / "Dockerfile").read_text()
    assert any("non-root" in p for p in dockerfile_problems(docker + "\nUSER root\n"))
    no_project = docker.replace("pip install -c constraints.txt .", "")
    assert any("pip install" in p for p in dockerfile_problems(no_project))
    unlocked = docker.replace("-c constraints.txt", "")
    assert any("without the lock" in p for p in dockerfile_problems(unlocked))
    open_world = 'aws ec2 authorize-security-group-ingress --ip-permissions "IpProtocol=tcp,'
    open_world += 'FromPort=8265,ToPort=8265,IpRanges=[{CidrIp=0.0.0.0/0}]"\n'
    assert len(_firewall_problems(open_world)) == 2
    gcp = "gcloud compute firewall-rules create x --allow tcp:10001 --source-ranges 0.0.0.0/0\n"
    assert len(_firewall_problems(gcp)) == 2
    assert _firewall_problems("echo nothing\n") == ["no ingress rule found"]
