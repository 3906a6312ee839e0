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
    pins = (REPO / "requirements.txt").read_text()
    assert "ray[train,tune,serve]==2.60.0" in pins
    assert any("requirements.txt" in c for c in config["setup_commands"])
    started = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in started and "RAY_AUTH_MODE=token" in started


def test_typo_in_a_field_fails(config):
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["max_wokers"] = 4  # typo
    with pytest.raises(Exception):
        _validate(broken)


def test_wrong_head_node_type_fails(config):
    broken = copy.deepcopy(config)
    broken["head_node_type"] = "no_such_type"
    with pytest.raises(Exception):
        _validate(broken)
