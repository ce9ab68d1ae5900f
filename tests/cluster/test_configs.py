"""Offline checks of cluster/ and jobs/: Ray's own config validation, KubeRay structure, job entries.

* Autoscaler YAML (AWS, GCP): Ray's ``prepare_config`` (merges the provider's defaults.yaml)
  then ``validate_config`` (the ray-schema.json JSON schema plus Ray's own checks), and the
  project's rules: a head without training, a CPU group and a spot/preemptible GPU group, the
  raymim image, token authentication on, the dashboard on loopback only, no setup commands.
* KubeRay: no KubeRay CRD schema ships with Ray or this repository (and none can be fetched
  offline), so the manifests are checked structurally (apiVersion ray.io/v1, kinds, required
  fields, group specs) and the RayCluster spec is also translated into an autoscaler config by
  Ray's own KubeRay code (``_derive_autoscaling_config_from_ray_cr``) and validated like the
  cloud YAMLs. The RayJob entrypoint must name a real config in jobs/configs.
* jobs/: runtime_env.yaml is accepted by Ray's ``RuntimeEnv``; each task has an entry that
  submits ``raymim <task>`` with the runtime env, forwarding storage variables, hard-coding none.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
JOBS = REPO / "jobs"
CLOUD_YAMLS = ["aws.yaml", "gcp.yaml"]
TASKS = ["prepare", "pretrain", "finetune", "tune"]


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _prepared(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    merged = prepare_config(copy.deepcopy(cfg))
    validate_config(merged)
    return merged


# --- Ray autoscaler YAML -------------------------------------------------------------------


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_autoscaler_yaml_passes_ray_validation(name):
    merged = _prepared(_load(name))
    assert merged["provider"]["type"] == name.split(".")[0]
    assert merged["cluster_name"] == "raymim"


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_autoscaler_yaml_rejects_a_broken_copy(name):
    """The validation is real: an unknown node-type key or a fractional resource fails it."""
    import jsonschema

    cfg = _load(name)
    bad = copy.deepcopy(cfg)
    bad["available_node_types"][bad["head_node_type"]]["instance_type"] = "oops"
    with pytest.raises(jsonschema.ValidationError):
        _prepared(bad)
    bad = copy.deepcopy(cfg)
    bad["available_node_types"][bad["head_node_type"]]["resources"]["CPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        _prepared(bad)


def _groups(cfg: dict) -> tuple[dict, dict, dict]:
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) >= 1]
    cpu = [v for v in workers.values() if v["resources"].get("GPU", 0) == 0 and v["resources"].get("CPU", 0) > 0]
    assert len(gpu) == 1 and len(cpu) == 1, f"want one CPU and one GPU worker group, got {list(workers)}"
    return head, cpu[0], gpu[0]


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_autoscaler_yaml_layout(name):
    cfg = _load(name)
    merged = _prepared(cfg)
    head, cpu, gpu = _groups(merged)
    # Head: no training or data work, never scaled.
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    assert head["max_workers"] == 0
    head_start = " ".join(merged["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start and "--num-gpus=0" in head_start
    # Autoscaling bounds.
    for group in (cpu, gpu):
        assert 0 <= group["min_workers"] <= group["max_workers"] <= merged["max_workers"]
    assert cpu["max_workers"] + gpu["max_workers"] <= merged["max_workers"]
    # GPU group on spot / preemptible capacity.
    node_config = json.dumps(gpu["node_config"])
    assert re.search(r'"MarketType": "spot"|"provisioningModel": "SPOT"|"preemptible": true', node_config), node_config
    # Minimal setup: the image has everything, and Ray's defaults (which pip-install other Ray
    # wheels) must not leak in through the merge.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert merged[key] == [], (key, merged[key])
    assert list(merged["file_mounts"]) == ["~/.ray/auth_token"]


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_autoscaler_yaml_security_and_image(name):
    cfg = _load(name)
    docker = cfg["docker"]
    run_options = " ".join(docker["run_options"])
    assert "RAY_AUTH_MODE=token" in run_options, "token authentication must stay on"
    assert "RAY_AUTH_MODE=disabled" not in (CLUSTER / name).read_text()
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts
    assert "0.0.0.0" not in starts, "the dashboard / job API must not listen publicly"
    assert "--ray-client-server-port" not in starts or "127.0.0.1" in starts
    if name == "aws.yaml":  # only SSH is opened to the outside
        perms = cfg["provider"]["security_group"]["IpPermissions"]
        assert [(p["FromPort"], p["ToPort"]) for p in perms] == [(22, 22)]
        assert all(r["CidrIp"] != "0.0.0.0/0" for p in perms for r in p["IpRanges"])
    # The image: built from cluster/docker/Dockerfile on the official Ray 2.60.0 GPU image.
    assert "raymim" in docker["image"]
    dockerfile = (CLUSTER / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1)
    assert re.fullmatch(r"rayproject/ray:2\.60\.0(-py311)?-(gpu|cu\d+)", base), base
    # Storage comes from the nodes' environment, and jobs read it.
    assert "RAYMIM_STORAGE=" in run_options and "MLFLOW_TRACKING_URI=" in run_options


# --- KubeRay ----------------------------------------------------------------------------------


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]


def _check_pod_template(template: dict, where: str) -> dict:
    spec = template["spec"]
    containers = spec["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers), where
    c = containers[0]
    assert "raymim" in c["image"], where
    assert {"configMapRef": {"name": "raymim-env"}} in c.get("envFrom", []), f"{where}: storage env missing"
    mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
    assert "/dev/shm" in mounts and "/mnt/raymim" in mounts, where
    volumes = {v["name"] for v in spec.get("volumes", [])}
    assert {m["name"] for m in c["volumeMounts"]} <= volumes, where
    return c


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == "2.60.0", where
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token authentication must be on"
    assert spec["enableInTreeAutoscaling"] is True, where
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: the head must not be exposed"
    assert head["rayStartParams"].get("num-cpus") == "0" and head["rayStartParams"].get("num-gpus") == "0"
    _check_pod_template(head["template"], f"{where} head")
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-data", "gpu-train"}, where
    for name, g in groups.items():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (where, name)
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), (where, name)
        assert all(isinstance(v, str) for v in head["rayStartParams"].values()), where
        c = _check_pod_template(g["template"], f"{where} {name}")
        gpus = c["resources"]["limits"].get("nvidia.com/gpu", 0)
        assert (gpus >= 1) == (name == "gpu-train"), (where, name, gpus)
    # Ray's own reading of the CR (what the in-tree autoscaler will see), validated by Ray.
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
          "metadata": {"name": "raymim", "namespace": "default"}, "spec": spec}
    derived = _derive_autoscaling_config_from_ray_cr(copy.deepcopy(cr))
    merged = _prepared(derived)
    types = merged["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert types["gpu-train"]["resources"]["GPU"] == 1 and "GPU" not in types["cpu-data"]["resources"]


def test_raycluster_manifest():
    docs = _docs("raycluster.yaml")
    kinds = {(d["apiVersion"], d["kind"]) for d in docs}
    assert kinds == {("v1", "ConfigMap"), ("ray.io/v1", "RayCluster")}
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert cm["metadata"]["name"] == "raymim-env"
    assert {"RAYMIM_STORAGE", "MLFLOW_TRACKING_URI"} <= set(cm["data"])
    rc = next(d for d in docs if d["kind"] == "RayCluster")
    assert rc["metadata"]["name"]
    _check_ray_cluster_spec(rc["spec"], "RayCluster")


def test_rayjob_manifest_resumes_a_real_config():
    (job,) = _docs("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "SidecarMode")
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    _check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob.rayClusterSpec")

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["raymim", "pretrain"], argv
    opts = dict(zip(argv[2::2], argv[3::2]))
    # A fixed --name: a retry (backoffLimit) or a re-submission resumes that run.
    assert opts.get("--name"), "the RayJob needs a fixed --name to resume instead of restarting"
    assert "--data" in opts
    config = opts["--config"]
    assert "/jobs/configs/" in config
    local = JOBS / "configs" / config.split("/jobs/configs/", 1)[1]
    assert local.is_file(), f"{config} is not a config in jobs/configs"
    # The image puts jobs/configs where the entrypoint looks.
    dockerfile = (CLUSTER / "docker" / "Dockerfile").read_text()
    assert re.search(r"COPY .*jobs/configs\s+" + re.escape(config.split("/jobs/configs/")[0]) + "/jobs/configs",
                     dockerfile), "cluster/docker/Dockerfile must copy jobs/configs to the entrypoint's path"

    from raymim.config import load_config

    cfg = load_config(local)
    gpu = next(g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu-train")
    assert cfg.train.use_gpu and cfg.train.num_workers <= gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert cfg.train.cpus_per_worker <= float(limits["cpu"])


# --- jobs/ ------------------------------------------------------------------------------------

STORAGE_LITERAL = re.compile(r"(s3|gs|gcs|hdfs)://|sqlite:|https?://(?!127\.0\.0\.1|docs\.)")


def test_runtime_env_is_valid_and_names_no_storage():
    from ray.runtime_env import RuntimeEnv

    text = (JOBS / "runtime_env.yaml").read_text()
    env = yaml.safe_load(text)
    RuntimeEnv(**env)  # Ray's own field validation
    assert "working_dir" not in env, "the working dir comes from `ray job submit --working-dir .`"
    assert ".venv" in env["excludes"] and "runs" in env["excludes"]
    assert not set(env.get("env_vars", {})) & {"RAYMIM_STORAGE", "MLFLOW_TRACKING_URI"}
    assert not STORAGE_LITERAL.search(text)


@pytest.mark.parametrize("task", TASKS)
def test_job_entry_exists_and_names_no_storage(task):
    path = JOBS / f"{task}.sh"
    assert path.is_file() and path.stat().st_mode & stat.S_IXUSR, f"{path} missing or not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)
    for p in (path, JOBS / "_submit.sh"):
        code = "\n".join(line for line in p.read_text().splitlines() if not line.lstrip().startswith("#"))
        assert not STORAGE_LITERAL.search(code), f"{p} hard-codes a storage location"


def _fake_ray(tmp_path: Path) -> Path:
    fake = tmp_path / "ray"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$RAY_AUTH_MODE" "$@" > "$FAKE_RAY_OUT"\n')
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("task", TASKS)
def test_job_entry_submits_the_task(task, tmp_path):
    out = tmp_path / "argv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RAYMIM_", "MLFLOW_"))}
    env.update(RAY_BIN=str(_fake_ray(tmp_path)), PYTHON=sys.executable, FAKE_RAY_OUT=str(out),
               RAY_ADDRESS="http://127.0.0.1:8265")
    subprocess.run(["bash", str(JOBS / f"{task}.sh"), "--config", "jobs/configs/mae-tiny.yaml", "--name", "r1"],
                   cwd=tmp_path, env=env, check=True)
    cwd, auth, *argv = out.read_text().splitlines()
    assert cwd == str(REPO) and auth == "token"
    sep = argv.index("--")
    opts, entry = argv[:sep], argv[sep + 1:]
    assert opts[:2] == ["job", "submit"]
    assert opts[opts.index("--address") + 1] == "http://127.0.0.1:8265"
    assert opts[opts.index("--working-dir") + 1] == "."
    assert opts[opts.index("--runtime-env") + 1] == str(JOBS / "runtime_env.yaml")
    assert opts[opts.index("--submission-id") + 1].startswith(f"raymim-{task}-")
    assert entry == ["raymim", task, "--config", "jobs/configs/mae-tiny.yaml", "--name", "r1"]


def test_job_entry_forwards_storage_from_the_submitting_shell(tmp_path):
    out = tmp_path / "argv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RAYMIM_", "MLFLOW_"))}
    env.update(RAY_BIN=str(_fake_ray(tmp_path)), PYTHON=sys.executable, FAKE_RAY_OUT=str(out),
               RAY_ADDRESS="http://127.0.0.1:8265", RAYMIM_STORAGE="/shared/ray",
               MLFLOW_TRACKING_URI="http://mlflow:5000", RAYMIM_SUBMISSION_ID="fixed-id")
    subprocess.run(["bash", str(JOBS / "pretrain.sh"), "--name", "r1"], cwd=tmp_path, env=env, check=True)
    argv = out.read_text().splitlines()[2:]
    assert "--runtime-env" not in argv
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    base = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    assert runtime_env["excludes"] == base["excludes"]
    assert runtime_env["env_vars"] == {**base["env_vars"], "RAYMIM_STORAGE": "/shared/ray",
                                       "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert argv[argv.index("--submission-id") + 1] == "fixed-id"


# --- local multi-node script ------------------------------------------------------------------


def test_local_script_bounds_nodes_and_keeps_auth_on():
    path = CLUSTER / "local.sh"
    assert path.stat().st_mode & stat.S_IXUSR
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    for needle in ("export RAY_AUTH_MODE=token", "--memory=", "--object-store-memory=", "--temp-dir=",
                   "--dashboard-host=127.0.0.1", "start)", "stop)"):
        assert needle in text, needle
    assert "ray stop" not in re.sub(r"#.*", "", text), "`ray stop` would kill every Ray on the machine"
