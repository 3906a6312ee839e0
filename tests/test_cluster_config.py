"""cluster.yaml passes Ray's own schema validation; broken copies do not."""

import copy

import pytest
import yaml
from conftest import REPO


def _validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid(config):
    _validate(config)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no training on the head
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    pins = (REPO / "pyproject.toml").read_text()
    assert "ray[train,tune,serve]==2.60.0" in pins
    assert any("pip install -q -e ~/placesnet" in c for c in config["setup_commands"])
    started = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in started and "RAY_AUTH_MODE=token" in started


def test_typo_in_a_field_fails(config):
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["max_wokers"] = 4  # typo
    from jsonschema.exceptions import ValidationError

    with pytest.raises(ValidationError, match="'max_wokers' was unexpected"):
        _validate(broken)


def test_wrong_head_node_type_fails(config):
    broken = copy.deepcopy(config)
    broken["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="`head_node_type` must be one of `available_node_types`"):
        _validate(broken)


K8S = REPO / "cluster" / "k8s"
SBATCH = REPO / "cluster" / "slurm" / "placesnet.sbatch"


@pytest.mark.parametrize(
    "name,kind",
    [("rayjob-train.yaml", "RayJob"), ("rayjob-sweep.yaml", "RayJob"), ("rayservice.yaml", "RayService")],
)
def test_kuberay_manifests(name, kind):
    doc = yaml.safe_load((K8S / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    spec = doc["spec"]
    cluster = spec["rayClusterSpec"] if kind == "RayJob" else spec["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no work on the head
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        container = group["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "valueFrom" in env["RAY_AUTH_TOKEN"]
        assert any(m["mountPath"] == "/data" for m in container["volumeMounts"])
    gpus = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpus["nvidia.com/gpu"] == "1"
    if kind == "RayJob":
        entry = spec["entrypoint"].split()
        assert entry[1] in ("rayjobs/train.py", "tuning/sweep.py") and (REPO / entry[1]).is_file()
        _parses(entry[1], entry[2:])
        assert "/data/ray_results" in spec["entrypoint"]  # shared storage
    else:
        app = yaml.safe_load(spec["serveConfigV2"])["applications"][0]
        assert app["import_path"] == "serving.app:build_app" and app["args"]["checkpoint"].startswith(
            "/data/"
        )
        # the endpoint's key comes from a Secret, into the env var the app is told to read
        key_env = app["args"]["api_key_env"]
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
            assert env[key_env]["valueFrom"]["secretKeyRef"]["name"] == "placesnet-api-key"


def test_serve_config_keeps_the_endpoint_on_the_machine():
    config = yaml.safe_load((REPO / "serving/config.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"  # opened only on purpose, with a key
    from placesnet.serve.options import SECRETS, parse_args

    args = config["applications"][0]["args"]
    assert not set(args) & set(SECRETS) or parse_args(args)  # if set, a valid reference


def _parses(script: str, args: list[str]) -> None:
    """The documented flags are accepted by the entry point's own parser."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("entry", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.parse_args(args)


def test_sbatch_script(tmp_path):
    import os
    import shutil
    import subprocess

    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(SBATCH)], check=True)
    for job, script in (("train", "rayjobs/train.py"), ("sweep", "tuning/sweep.py")):
        env = {
            **os.environ,
            "DRY_RUN": "1",
            "JOB": job,
            "SLURM_JOB_NUM_NODES": "2",
            "SLURM_GPUS_PER_NODE": "gpu:4",
            "HOME": str(tmp_path),
        }
        out = (
            subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, check=True)
            .stdout.strip()
            .splitlines()[-1]
            .split()
        )
        assert out[:3] == ["srun", "--nodes=2", "--ntasks-per-node=1"]
        assert out[4] == "symmetric-run" and "--min-nodes" in out
        entry = out[out.index("--") + 1 :]
        assert entry[:2] == ["python", script]
        _parses(script, entry[2:])
        if job == "train":
            assert entry[entry.index("--num-workers") + 1] == "8"  # 2 nodes x 4 GPUs
    bad = subprocess.run(
        ["bash", str(SBATCH)],
        env={**os.environ, "DRY_RUN": "1", "JOB": "nope"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "JOB must be train or sweep" in bad.stderr
