"""Published models by name: first use downloads, checks and converts; later uses read the cache.

The "internet" here is an HTTP server on 127.0.0.1 started by the test and shut down after it.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch
from segmenter_reference import segmenter_state, write_mmseg_release

from tokenscope.errors import CheckpointError
from tokenscope.models import published
from tokenscope.models.resolve import build_model
from tokenscope.models.published import PublishedModel


class _Server:
    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        server_self = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):  # noqa: ANN002, ANN003
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self) -> None:  # noqa: N802
                server_self.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args) -> None:  # noqa: ANN002
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 5
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    s = _Server(tmp_path / "www")
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def served_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: _Server) -> tuple[Path, str]:
    monkeypatch.setenv("TOKENSCOPE_HOME", str(tmp_path / "cache"))
    ckpt = write_mmseg_release(tmp_path / "www", segmenter_state("mask", seed=11))
    return ckpt, hashlib.sha256(ckpt.read_bytes()).hexdigest()


def _register(monkeypatch: pytest.MonkeyPatch, name: str, url: str, sha: str) -> None:
    entry = PublishedModel(name=name, backbone="ViT-tiny", dataset="ade20k", decoder="mask", crop=64, miou=1.0,
                           url=url, sha256=sha, overrides={"window": 64, "stride": 48})
    monkeypatch.setitem(published.PUBLISHED, name, entry)


def test_first_use_downloads_and_converts_second_use_reads_the_cache(
        monkeypatch: pytest.MonkeyPatch, server: _Server, served_checkpoint: tuple[Path, str]) -> None:
    ckpt, sha = served_checkpoint
    _register(monkeypatch, "tiny-pub", server.url(ckpt.name), sha[:8])  # a published 8-digit prefix
    first = build_model("tiny-pub")
    assert server.requests == [f"/{ckpt.name}"]
    cached = published.converted_path("tiny-pub")
    assert cached.is_file() and cached.with_suffix(".safetensors").is_file()
    assert first.config.window == 64 and first.config.stride == 48
    second = build_model("tiny-pub")
    assert len(server.requests) == 1  # nothing downloaded the second time
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plain = first.model.default_setting().plain()
    with torch.no_grad():
        assert torch.equal(first.model(x, setting=plain).patch_logits, second.model(x, setting=plain).patch_logits)
    assert first.trained["policy"] is False and any("imported Segmenter" in w for w in first.warnings)


def test_a_download_with_the_wrong_hash_is_an_error_and_leaves_nothing(
        monkeypatch: pytest.MonkeyPatch, server: _Server, served_checkpoint: tuple[Path, str]) -> None:
    ckpt, sha = served_checkpoint
    _register(monkeypatch, "tiny-bad", server.url(ckpt.name), "0" * 64)
    with pytest.raises(CheckpointError, match="SHA-256 .* expected 0000"):
        build_model("tiny-bad")
    assert len(server.requests) == 1
    assert not published.model_dir("tiny-bad").exists() and not (published.cache_root() / "models").exists()
    assert not any(published.cache_root().rglob("*.part"))


def test_offline_first_use_names_the_file_to_fetch_and_where_to_put_it(
        monkeypatch: pytest.MonkeyPatch, server: _Server, served_checkpoint: tuple[Path, str]) -> None:
    ckpt, sha = served_checkpoint
    _register(monkeypatch, "tiny-offline", server.url("missing.pth"), sha)
    with pytest.raises(CheckpointError, match=r"cannot download tiny-offline .*put it at .*missing\.pth"):
        build_model("tiny-offline")
    assert not published.model_dir("tiny-offline").exists()
    # the user puts the file there by hand: it is checked and used, without the network
    target = published.download_path(published.lookup("tiny-offline"))
    target.parent.mkdir(parents=True)
    target.write_bytes(ckpt.read_bytes())
    n = len(server.requests)
    loaded = build_model("tiny-offline")
    assert len(server.requests) == n and loaded.config.name == "tiny-offline"


def test_registry_entries_are_complete() -> None:
    for name, m in published.PUBLISHED.items():
        if m.family == "eomt":  # EoMT's model zoo: Hugging Face files, no published digest (recorded at download)
            assert m.url.startswith("https://huggingface.co/tue-mps/") and m.sha256 == "" and m.approx_bytes > 0
            assert m.classes in (150, 19) and 50 < m.miou < 90 and "recorded" in m.digest_note
            continue
        assert name == m.name and m.url.startswith("https://") and m.url.endswith(".pth")
        assert len(m.sha256) >= 8 and all(c in "0123456789abcdef" for c in m.sha256)
        assert m.filename.split("-")[-1] == f"{m.sha256}.pth"  # mmseg names carry the hash prefix
        assert m.classes == 150 and 30 < m.miou < 60


def test_published_architectures_build_without_download_for_speed_studies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENSCOPE_HOME", str(tmp_path / "cache"))
    loaded = build_model("segmenter-vit-t-mask-ade20k", random_init=True)
    cfg = loaded.config
    assert (cfg.decoder, cfg.decoder_heads, cfg.timm_kwargs["embed_dim"], cfg.timm_kwargs["depth"]) == ("mask", 3, 192, 12)
    assert (cfg.img_size, cfg.window, cfg.stride, cfg.resize_short, cfg.num_classes) == (512, 512, 480, 512, 150)
    assert cfg.class_names[:2] == ("wall", "building") and loaded.weights_id.startswith("random-init")
    assert not (tmp_path / "cache").exists()  # nothing was downloaded


def test_the_published_table_reads_numbers_from_result_files_and_says_what_is_not_measured(tmp_path: Path) -> None:
    import subprocess
    import sys

    import pandas as pd

    pd.DataFrame([{"point": "baseline", "miou": 0.4612, "gflops_per_image": 38.2},
                  {"point": "algm:threshold=0.88", "miou": 0.4501, "gflops_per_image": 27.0}]).to_csv(
        tmp_path / "segmenter-vit-s-mask-ade20k.csv", index=False)
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "published_table.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True, cwd=root).stdout
    rows = [ln for ln in out.splitlines() if ln.startswith("| segmenter")]
    assert len(rows) == 4 * sum(m.family == "segmenter" for m in published.PUBLISHED.values())
    eomt = [ln for ln in out.splitlines() if ln.startswith("| eomt")]
    assert eomt and all("not measured yet" in r for r in eomt) and "tue-mps/eomt model_zoo/dinov2.md" in eomt[0]
    s_base = next(r for r in rows if r.startswith("| segmenter-vit-s-mask-ade20k | vit"))
    assert "| 46.19 |" in s_base and "| 46.12 | 38.2 |" in s_base
    s_algm = next(r for r in rows if r.startswith("| segmenter-vit-s-mask-ade20k | algm"))
    assert "| 46.40 |" in s_algm and "| 45.01 | 27.0 |" in s_algm and "fine-tuned with ALGM" in s_algm
    assert all("not measured yet" in r for r in rows if not r.startswith("| segmenter-vit-s-mask-ade20k"))
