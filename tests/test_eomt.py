"""EoMT checkpoints load exactly: tiny models in both of EoMT's file layouts, patch 14 and 16, against
an independent forward written here from EoMT's published formulas (tue-mps/eomt, models/eomt.py
and the semantic inference of training/lightning_module.py). Then every method on EoMT, queries
protected, and the accounting invariant on every trace."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenscope.data.images import prepare_image
from tokenscope.errors import CheckpointError, ConfigError
from tokenscope.jobs.setup import ModelOptions, load_model, method_setting
from tokenscope.models.resolve import build_model
from tokenscope.trace.capture import TraceCapture

DIM, DEPTH, HEADS, QUERIES, CLASSES, QUERY_BLOCKS = 128, 6, 2, 7, 5, 2
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _Upscale(nn.Module):
    """EoMT's ScaleBlock, spelled out: transposed 2x2 conv, GELU, depthwise 3x3 conv, LayerNorm2d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(DIM, DIM, 2, stride=2)
        self.conv2 = nn.Conv2d(DIM, DIM, 3, padding=1, groups=DIM, bias=False)
        self.norm = nn.LayerNorm(DIM, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(F.gelu(self.conv1(x)))
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ReferenceEoMT(nn.Module):
    """An EoMT network for semantic inference, from the paper's and the code's formulas."""

    def __init__(self, patch: int, img: int) -> None:
        super().__init__()
        self.backbone = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=img,
                                          patch_size=patch, num_classes=0, embed_dim=DIM, depth=DEPTH, num_heads=HEADS)
        self.q = nn.Embedding(QUERIES, DIM)
        self.class_head = nn.Linear(DIM, CLASSES + 1)
        self.mask_head = nn.Sequential(nn.Linear(DIM, DIM), nn.GELU(), nn.Linear(DIM, DIM), nn.GELU(), nn.Linear(DIM, DIM))
        self.upscale = nn.Sequential(*[_Upscale() for _ in range(max(1, int(math.log2(patch)) - 2))])
        with torch.no_grad():  # livelier weights than the initialisation, so classes and masks differ clearly
            for p in self.parameters():
                p.add_(0.05 * torch.randn_like(p))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Per-pixel class scores (B, C, H, W) of images in [0, 1] (EoMT: uint8 / 255)."""
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        std = torch.tensor(STD).view(1, 3, 1, 1)
        vit = self.backbone
        x = vit._pos_embed(vit.patch_embed((pixels - mean) / std))
        for i, blk in enumerate(vit.blocks):
            if i == DEPTH - QUERY_BLOCKS:
                x = torch.cat([self.q.weight[None].expand(x.shape[0], -1, -1), x], dim=1)
            x = blk(x)
        x = vit.norm(x)
        q = x[:, :QUERIES]
        grid = x[:, QUERIES + vit.num_prefix_tokens:].transpose(1, 2).reshape(x.shape[0], DIM, *vit.patch_embed.grid_size)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_head(q), self.upscale(grid))
        masks = F.interpolate(masks, pixels.shape[-2:], mode="bilinear")
        return torch.einsum("bqhw,bqc->bchw", masks.sigmoid(), self.class_head(q).softmax(dim=-1)[..., :-1])

    def eomt_state(self) -> dict[str, torch.Tensor]:
        """The LightningModule's state dict names (network.*), as EoMT saves them."""
        state = {f"network.encoder.backbone.{k}": v for k, v in self.backbone.state_dict().items()}
        for part in ("q", "class_head", "mask_head", "upscale"):
            state.update({f"network.{part}.{k}": v for k, v in getattr(self, part).state_dict().items()})
        state["network.encoder.pixel_mean"] = torch.tensor(MEAN).view(1, 3, 1, 1)
        state["network.encoder.pixel_std"] = torch.tensor(STD).view(1, 3, 1, 1)
        state["network.attn_mask_probs"] = torch.ones(QUERY_BLOCKS)
        state["criterion.empty_weight"] = torch.ones(CLASSES + 1)
        return state


def write_eomt(folder: Path, patch: int, img: int, layout: str, seed: int = 0, probs: float = 1.0
               ) -> tuple[Path, ReferenceEoMT]:
    torch.manual_seed(seed)
    ref = ReferenceEoMT(patch, img).eval()
    state = ref.eomt_state()
    state["network.attn_mask_probs"] = torch.full((QUERY_BLOCKS,), probs)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "bin":
        path = folder / "pytorch_model.bin"
        torch.save(state, path)
    else:
        path = folder / "epoch=3.ckpt"
        torch.save({"state_dict": state, "epoch": 3, "global_step": 100}, path)
    return path, ref


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[: h // 2] = (40, 120, 200)
    img[h // 2:, : w // 3] = (90, 160, 60)
    img[h // 2:, w // 3:] = (120, 110, 100)
    return np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("patch, img, layout, annealed", [(16, 128, "bin", 1.0), (16, 128, "ckpt", 0.0),
                                                         (14, 126, "bin", 0.0), (14, 126, "ckpt", 1.0)])
def test_an_eomt_checkpoint_gives_the_reference_scores_and_label_map(tmp_path: Path, patch: int, img: int,
                                                                      layout: str, annealed: float) -> None:
    """`annealed`: the masked-attention probabilities the file holds (1 = masked attention still on in
    training, 0 = annealed away); inference runs without masked attention either way, as EoMT's does."""
    path, ref = write_eomt(tmp_path, patch, img, layout, probs=annealed)
    loaded = build_model("demo", weights=str(path))
    cfg = loaded.config
    assert (cfg.decoder, cfg.queries, cfg.query_blocks, cfg.num_classes, cfg.img_size) == ("eomt", QUERIES, QUERY_BLOCKS,
                                                                                          CLASSES, img)
    assert loaded.trained["backbone"] and loaded.trained["decoder"] and not loaded.trained["exits"]
    loaded, device = load_model(ModelOptions(device="cpu", method="vit"), loaded=loaded)
    rgb = _image(img, img)
    prepared = prepare_image(rgb.astype(np.float32) / 255.0, "scene", patch=patch)
    capture = TraceCapture(loaded, device)
    traces, scores = capture.run([prepared])
    with torch.no_grad():
        expected = ref(torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)[None])
    assert scores.shape == expected.shape
    assert float((scores - expected).abs().max()) < 1e-4
    assert np.array_equal(traces[0].label_map, expected.argmax(dim=1)[0].numpy())
    assert len(np.unique(traces[0].label_map)) > 1  # the check is not of a constant map
    traces[0].assert_consistent()
    assert traces[0].meta.num_prefix_tokens == 5  # the class token and 4 registers; queries are not counted


def test_eomt_windows_are_spread_evenly_along_the_long_side_as_eomt_crops(tmp_path: Path) -> None:
    from tokenscope.analysis.windowed import predict
    from tokenscope.data.windows import plan_windows, resolve_windows

    path, ref = write_eomt(tmp_path, 16, 128, "bin", seed=2)
    loaded, device = load_model(ModelOptions(model="demo", weights=str(path), device="cpu", method="vit"))
    cfg = loaded.config
    spec = resolve_windows(cfg.window, cfg.stride, cfg.resize_short, None, None, None, 16)
    plan = plan_windows((128, 300), spec.window, spec.stride, spec.resize_short)
    assert [b[1] for b in plan.boxes] == [0, 86, 172]  # ceil(300 / 128) = 3 crops, equal overlaps, as EoMT cuts
    rgb = _image(128, 300, seed=1)
    pred = predict(TraceCapture(loaded, device), prepare_image(rgb.astype(np.float32) / 255.0, "wide"), spec)
    x = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        total = torch.zeros((CLASSES, 128, 300))
        count = torch.zeros((1, 128, 300))
        for start in (0, 86, 172):
            total[:, :, start:start + 128] += ref(x[..., start:start + 128])[0]
            count[:, :, start:start + 128] += 1
    assert np.array_equal(pred.label_map, (total / count).argmax(dim=0).numpy())
    for t in pred.traces:
        t.assert_consistent()


@pytest.mark.parametrize("method", ["step", "tome:r=8", "algm:threshold=0.5", "evit:rate=0.6", "dtop+tome:r=4",
                                    "dcts"])
def test_every_method_runs_on_eomt_with_the_queries_protected(tmp_path: Path, method: str) -> None:
    path, _ = write_eomt(tmp_path, 16, 128, "bin", seed=3)
    loaded = build_model("demo", weights=str(path))
    opts = ModelOptions(device="cpu", policy="uniform", exit_threshold=0.3)
    device = torch.device("cpu")
    loaded.trained["exits"] = True  # random gates stand in for trained ones: this checks the mechanics
    setting = method_setting(loaded, opts, method)
    seen: list[tuple[int, int]] = []
    handles = [s.register_forward_pre_hook(lambda m, a: seen.append((a[0].block, a[0].prefix.shape[1])))
               for s in (step.module for step in setting.steps)]
    capture = TraceCapture(loaded, device, setting)
    rgb = _image(128, 128, seed=4)
    try:
        trace = capture([prepare_image(rgb.astype(np.float32) / 255.0, "scene")])[0]
    finally:
        for h in handles:
            h.remove()
    trace.assert_consistent()  # every patch in one token; each token merged, pruned, exited or at the end once
    assert trace.block_tokens_in.max() <= trace.num_patches  # the 7 queries are never counted as image tokens
    joins = loaded.model.joins_at
    assert joins == DEPTH - QUERY_BLOCKS + 1 and all(k < joins for k in loaded.model.exit_after)
    assert trace.meta.flops["total"] <= trace.meta.flops["baseline_total"]
    assert (trace.meta.queries, trace.meta.queries_join_at) == (QUERIES, joins)  # the query blocks, marked
    from tokenscope.render.explorer import trace_panel

    assert trace_panel(trace, "x")["query_blocks"] == [joins, DEPTH]
    if setting.steps:
        assert seen  # in front of what a step sees: class token, 4 registers, fused tokens, and the queries once they joined
        assert all(p >= (5 + QUERIES if block >= joins else 5) for block, p in seen)


def _with_extra_key(folder: Path, key: str) -> Path:
    """An EoMT file with one tensor more, named `key`."""
    path, _ = write_eomt(folder, 16, 128, "bin")
    state = torch.load(path)
    state[key] = torch.ones(2)
    torch.save(state, folder / "extra.bin")
    return folder / "extra.bin"


def test_eomt_refuses_gates_inside_the_query_blocks_and_foreign_files(tmp_path: Path) -> None:
    from tokenscope.models.registry import StepConfig
    from tokenscope.models.step_vit import StepViT

    cfg = StepConfig(name="e", arch="vit_small_patch14_reg4_dinov2", num_classes=3, exit_after=(5,), img_size=64,
                     decoder="eomt", queries=4, query_blocks=2,
                     timm_kwargs={"patch_size": 16, "embed_dim": 64, "depth": 6, "num_heads": 1})
    with pytest.raises(ConfigError, match="sit inside the query blocks"):
        StepViT(cfg)
    with pytest.raises(CheckpointError, match="unexpected weights .*extra_thing"):
        build_model("demo", weights=str(_with_extra_key(tmp_path, "network.extra_thing.weight")))


def test_eomt_flops_of_the_cost_model_are_torchs_count(tmp_path: Path) -> None:
    from tokenscope.models.cost import measure_flops
    from tokenscope.trace.capture import images_to_tensor

    path, _ = write_eomt(tmp_path, 16, 128, "bin", seed=5)
    loaded = build_model("demo", weights=str(path))
    loaded.trained["exits"] = True
    prepared = prepare_image(_image(128, 128, seed=6).astype(np.float32) / 255.0, "scene")
    for point in ("vit", "dtop:exit=0.25"):
        loaded.setting = method_setting(loaded, ModelOptions(device="cpu"), point)
        trace = TraceCapture(loaded, torch.device("cpu"))([prepared])[0]
        x, _ = images_to_tensor([prepared], torch.device("cpu"))
        with torch.no_grad():
            total, per_module, _ = measure_flops(lambda: loaded.model(x, setting=loaded.setting))
        assert trace.meta.flops["total"] == total, point
    assert trace.exited_early.any()  # the second point really dropped tokens before the query blocks


def test_rope_backbones_tokenscope_cannot_place_are_refused_in_one_line_saying_why(tmp_path: Path) -> None:
    build_model("timm:vit_small_patch16_dinov3", random_init=True)  # DINOv3's RoPE: placed (tests/test_rotary.py)
    with pytest.raises(ConfigError, match="rotary position embedding .*RotaryEmbeddingCat.*DINOv3") as err:
        build_model("timm:eva02_tiny_patch14_224", random_init=True)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="DINOv3 backbone .*not read yet"):
        build_model("demo", weights=str(_with_extra_key(tmp_path, "network.encoder.backbone.rope_embeddings.periods")))


def test_published_eomt_models_build_their_architecture_without_downloading() -> None:
    from tokenscope.models.published import PUBLISHED

    for name, classes, crop in (("eomt-l-ade20k-512", 150, 512), ("eomt-l-cityscapes-1024", 19, 1024)):
        entry = PUBLISHED[name]
        assert entry.family == "eomt" and entry.url.endswith("/pytorch_model.bin") and entry.sha256 == ""
        from tokenscope.models.resolve import published_architecture

        cfg = published_architecture(entry)
        assert (cfg.decoder, cfg.queries, cfg.query_blocks, cfg.num_classes, cfg.img_size) == ("eomt", 100, 4, classes, crop)
        assert cfg.timm_kwargs["embed_dim"] == 1024 and cfg.timm_kwargs["depth"] == 24 and cfg.stride == -1
        assert all(k < 21 for k in cfg.exit_after)  # the gates sit before the query blocks (21..24)


def test_one_front_door_picks_the_reader_by_what_the_file_holds(tmp_path: Path) -> None:
    from tokenscope.models.resolve import READERS, reader_for

    _, ref = write_eomt(tmp_path, 16, 128, "bin")
    state = ref.eomt_state()
    assert [r.family for r in READERS] == ["Segmenter", "EoMT"]
    assert reader_for(state).family == "EoMT" and reader_for({"state_dict": state}).family == "EoMT"
    assert reader_for({"model": {"encoder.pos_embed": torch.zeros(1), "decoder.head.weight": torch.zeros(1)}}).family == "Segmenter"
    assert reader_for({"something": torch.zeros(1)}) is None


def test_training_an_eomt_model_is_refused_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tokenscope.cli import app

    path, _ = write_eomt(tmp_path, 16, 128, "bin")
    r = CliRunner().invoke(app, ["train", "--init", str(path), "--out", str(tmp_path / "t"), "--steps", "1",
                                 "--device", "cpu"])
    assert r.exit_code == 2 and "does not train EoMT models" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "t.json").exists()
