"""compress_bucket on a simulated two-node cluster, each node with one (fake) GPU."""

from __future__ import annotations

import os
import shutil
from collections import Counter

import pytest
import ray
from ray.cluster_utils import Cluster

from pipeline.compress import CompressConfig, run_compress
from pipeline.manifest import read_manifests
from pipeline.storage import open_location

from .pipeline_fixtures import S3_ENV, build_dataset, free_port, private_temp_dir

pytestmark = pytest.mark.slow


@pytest.fixture
def two_gpu_nodes(weights_dir, monkeypatch):
    """Two Ray nodes with one fake GPU each, in a private temp dir.

    `Cluster` writes the head's address to <Ray's default temp dir>/ray_current_cluster
    (/tmp/ray/ unless RAY_TMPDIR says otherwise), and fails on a fresh machine where that
    folder does not exist yet. Pointing RAY_TMPDIR at our own folder, created here, makes it
    work anywhere, and keeps `ray.init(address="auto")` elsewhere on the machine from
    finding this test's cluster.
    """
    temp_dir = private_temp_dir()
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    node = {"num_cpus": 2, "num_gpus": 1, "object_store_memory": 150 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={
        **node, "gcs_server_port": free_port(), "include_dashboard": False, "temp_dir": temp_dir})
    try:
        cluster.add_node(**node)
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_one_encoder_per_gpu_on_each_node(two_gpu_nodes, tmp_path, monkeypatch):
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    data = build_dataset(tmp_path / "in", n_good=6, faults=False)
    summary = run_compress(CompressConfig(str(data.folder), str(tmp_path / "out"), "uqdm-test", batch_size=1))
    assert len(summary.encoders) == 2
    nodes = {node for encoder in summary.encoders.values() for node in encoder["nodes"]}
    assert len(nodes) == 2, summary.encoders
    # The GPUs are fake: torch sees none, so the codecs ran on CPU.
    assert all(encoder["devices"] == ["cpu"] for encoder in summary.encoders.values())
    assert all(encoder["images"] > 0 for encoder in summary.encoders.values())
    rows = read_manifests(open_location(str(tmp_path / "out"))).to_pylist()
    assert Counter(r["key"] for r in rows) == Counter(list(data.good))
