"""Pretrained weights fetched as pytorch-fid and torchvision fetch them (synreal_ray/hub.py): into
torch's hub cache, the hash in the file name checked. Never the real network: a local HTTP server
serves seeded random-weight files, and a closed port plays the offline machine."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import socket
import threading

import pytest

from synreal_ray import fid, segment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def inception_file(random_inception):
    return random_inception


@pytest.fixture
def server(tmp_path):
    """A local HTTP server over tmp_path/www; yields (base URL, folder, list of requested paths)."""
    www = tmp_path / "www"
    www.mkdir()
    requested = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www, requested
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch cache; no weights file given through the environment."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def serve(www, src: str, stem: str, prefix: str | None = None) -> str:
    """Copy `src` into the server's folder as `stem-<hash prefix>.pth` (its own SHA-256 prefix unless given)."""
    prefix = prefix or hashlib.sha256(open(src, "rb").read()).hexdigest()[:8]
    name = f"{stem}-{prefix}.pth"
    shutil.copy(src, www / name)
    return name


def refused_url(name: str) -> str:
    with socket.socket() as s:  # a port nothing listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def test_inception_weights_downloaded_once_into_torch_cache_hash_checked(inception_file, server, torch_home,
                                                                         monkeypatch):
    base, www, requested = server
    name = serve(www, inception_file, "pt_inception-test")
    monkeypatch.setenv(fid.URL_ENV, f"{base}/{name}")
    path = fid.find_weights(None)
    assert path == str(torch_home / name)
    assert open(path, "rb").read() == open(inception_file, "rb").read()
    assert fid.find_weights(None) == path and requested == [f"/{name}"]  # cached: no second request
    assert fid.load_inception(path, 64) is not None  # pytorch-fid's network takes the file

    bad = serve(www, inception_file, "pt_inception-bad", prefix="00000000")
    monkeypatch.setenv(fid.URL_ENV, f"{base}/{bad}")
    with pytest.raises(ValueError, match="does not match the hash in its name"):
        fid.find_weights(None)
    assert sorted(os.listdir(torch_home)) == [name]  # nothing of the bad download is kept


def test_offline_inception_error_and_demo_fallback(torch_home, tmp_path, monkeypatch):
    from synreal_ray.pipeline import inception_weights, load_pipeline_config

    monkeypatch.setenv(fid.URL_ENV, refused_url("pt_inception-2015-12-05-6726825d.pth"))
    with pytest.raises(FileNotFoundError) as e:
        fid.find_weights(None)
    msg = str(e.value)
    assert msg.startswith("no Inception weights for FID") and "Connection refused" in msg
    assert fid._fid_weights_url() in msg and "--inception-weights" in msg and fid.hub_weights_path() in msg
    assert not os.path.exists(torch_home / "pt_inception-2015-12-05-6726825d.pth")
    cfg = load_pipeline_config(os.path.join(REPO, "configs", "demo.yaml"), {"out": str(tmp_path / "out")})
    weights, is_random = inception_weights(cfg)  # the demo: labelled seeded random weights
    assert is_random and weights.endswith("random-inception-seed0.pth") and os.path.exists(weights)


def test_pytorch_fids_own_loader_finds_the_cached_file(inception_file, torch_home):
    """The cache path is where pytorch-fid's unpatched InceptionV3 looks: it builds from the file there
    without downloading (a download would fail: nothing is reachable)."""
    import torch
    from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3

    assert fid.hub_weights_path() == str(torch_home / os.path.basename(FID_WEIGHTS_URL))
    torch_home.mkdir(parents=True)
    shutil.copy(inception_file, fid.hub_weights_path())
    assert fid.find_weights(None) == fid.hub_weights_path()
    net = InceptionV3([0])
    state = torch.load(inception_file, weights_only=True)
    assert torch.equal(net.blocks[0][0].conv.weight, state["Conv2d_1a_3x3.conv.weight"])


def test_segment_backbone_imagenet_from_cache_or_download(server, torch_home, tmp_path, monkeypatch):
    import torch
    import torchvision

    from synreal_ray.config import from_dict

    model = "lraspp_mobilenet_v3_large"
    assert segment.imagenet_backbone_url(model) == torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1.url
    cfg = from_dict(segment.SegmentConfig, {"train": [{"uri": "d", "layout": "cityscapes"}], "backbone_weights": "imagenet"})
    assert cfg.backbone_weights == "imagenet"  # a keyword, not made a path
    assert segment.SegmentConfig(train=cfg.train).backbone_weights is None  # default: from scratch

    torch.manual_seed(0)
    src = tmp_path / "mnv3.pth"
    torch.save(torchvision.models.mobilenet_v3_large(weights=None).state_dict(), src)
    base, www, requested = server
    name = serve(www, str(src), "mobilenet_v3_large")
    monkeypatch.setattr(segment, "imagenet_backbone_url", lambda m: f"{base}/{name}")
    state = segment.read_backbone("imagenet", model)  # downloaded into the cache, then read
    assert requested == [f"/{name}"] and os.path.exists(torch_home / name)
    seg = segment.build_segmenter(model, backbone=state)
    assert torch.equal(seg.backbone["0"][0].weight, state["features.0.0.weight"])
    assert segment.backbone_file("imagenet", model) == str(torch_home / name) and len(requested) == 1  # cached

    monkeypatch.setattr(segment, "imagenet_backbone_url", lambda m: refused_url("mobilenet_v3_large-8738ca79.pth"))
    with pytest.raises(FileNotFoundError, match="backbone_weights: imagenet: .*Connection refused.*train from scratch"):
        segment.read_backbone("imagenet", model)
