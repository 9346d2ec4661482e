"""Hugging Face model folders: a transformers EoMT saved with `save_pretrained` runs in tokenscope (read
without transformers, no code run), and with reduction off gives transformers' own per-pixel scores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from tokenscope.cli import app  # noqa: E402
from tokenscope.errors import CheckpointError  # noqa: E402
from tokenscope.models.resolve import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "sample_images" / "street_5000001.png"
CROP = 64
LABELS = {0: "road", 1: "building", 2: "sky"}


def save_tiny_eomt(folder: Path, seed: int = 0) -> torch.nn.Module:
    """A tiny EoMT built with transformers' own config class, saved with save_pretrained (and a
    preprocessor file), weights drawn livelier than the init so that classes differ clearly."""
    from transformers import EomtConfig, EomtForUniversalSegmentation, EomtImageProcessor

    torch.manual_seed(seed)
    config = EomtConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, patch_size=16, image_size=CROP,
                        num_register_tokens=4, num_queries=6, num_blocks=2, num_upscale_blocks=2,
                        num_labels=len(LABELS), id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    model = EomtForUniversalSegmentation(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.3)
        model.attn_mask_probs.zero_()  # masked attention off, as released models run at inference
    model.save_pretrained(folder, safe_serialization=True)
    EomtImageProcessor(size={"shortest_edge": CROP, "longest_edge": CROP}, image_mean=[0.5, 0.45, 0.4],
                       image_std=[0.25, 0.2, 0.3]).save_pretrained(folder)
    return model


def _pixels(seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(seed))


def test_a_transformers_eomt_folder_gives_transformers_own_scores(tmp_path: Path) -> None:
    reference = save_tiny_eomt(tmp_path / "eomt")
    loaded = build_model("demo", weights=str(tmp_path / "eomt"))
    model = loaded.model.eval()
    assert loaded.config.class_names == ("road", "building", "sky") and loaded.config.num_classes == 3
    assert loaded.config.pixel_mean == (0.5, 0.45, 0.4) and loaded.config.pixel_std == (0.25, 0.2, 0.3)
    x = _pixels()  # RGB in [0, 1]: tokenscope normalises inside, transformers is given normalised pixels
    mean, std = torch.tensor([0.5, 0.45, 0.4]).view(1, 3, 1, 1), torch.tensor([0.25, 0.2, 0.3]).view(1, 3, 1, 1)
    from transformers import EomtImageProcessor

    processor = EomtImageProcessor.from_pretrained(tmp_path / "eomt")
    with torch.no_grad():
        out = model(x, setting=model.default_setting().plain())
        ours = model.pixel_logits(out, (CROP, CROP))
        ref_out = reference(pixel_values=(x - mean) / std)
        ref = processor.post_process_semantic_segmentation(ref_out, target_sizes=[(CROP, CROP)] * 2,
                                                           return_segmentation_scores=True)
    theirs = torch.stack([r.segmentation_scores for r in ref])
    assert (ours - theirs).abs().max().item() < 1e-4
    assert torch.equal(ours.argmax(1), torch.stack([r.segmentation for r in ref]))
    assert theirs.argmax(1).unique().numel() > 1  # the classes differ: a real check, not all one label


def test_every_method_runs_on_a_transformers_eomt_folder_and_accounts_for_every_patch(tmp_path: Path) -> None:
    save_tiny_eomt(tmp_path / "eomt")
    r = CliRunner().invoke(app, ["compare", str(IMAGE), "--weights", str(tmp_path / "eomt"), "--methods",
                                 "tome:r=2,algm,evit,pitome", "--size", "96", "--window", "0", "--device", "cpu", "--repeats", "1",
                                 "--warmup", "0", "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    folder = next((tmp_path / "c").glob("compare-*"))
    from tokenscope.trace.trace import Trace

    traces = [Trace.load(p.parent) for p in folder.rglob("trace.json")]
    assert len(traces) == 5
    for t in traces:
        t.assert_consistent()
        assert t.meta.class_names == ("road", "building", "sky")


def test_other_model_types_and_damaged_folders_are_one_line(tmp_path: Path) -> None:
    save_tiny_eomt(tmp_path / "eomt")
    other = tmp_path / "bert"
    shutil.copytree(tmp_path / "eomt", other)
    doc = json.loads((other / "config.json").read_text())
    for model_type, words in (("bert", "model_type 'bert'"), ("eomt_dinov3", "weights an EoMT-DINOv3 model does not have")):
        doc["model_type"] = model_type
        (other / "config.json").write_text(json.dumps(doc))
        with pytest.raises(CheckpointError, match=words):
            build_model("demo", weights=str(other))
    doc["model_type"], doc["num_attention_heads"] = "eomt", "two"
    (other / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="num_attention_heads' must be a whole number"):
        build_model("demo", weights=str(other))
    (tmp_path / "eomt" / "model.safetensors").write_bytes(b"\x00" * 16)
    r = CliRunner().invoke(app, ["run", str(IMAGE), "--weights", str(tmp_path / "eomt"), "--device", "cpu",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "cannot read weights" in r.output and "Traceback" not in r.output


def test_a_model_in_the_hugging_face_cache_is_found_by_its_id_offline(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub cache's own layout (refs/REVISION names a snapshot), made here; nothing is downloaded."""
    save_tiny_eomt(tmp_path / "eomt")
    repo = tmp_path / "hub" / "models--tue-mps--tiny_eomt"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(tmp_path / "eomt", snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TOKENSCOPE_OFFLINE", "1")
    direct = build_model("demo", weights=str(tmp_path / "eomt"))
    for spelled in ("hf:tue-mps/tiny_eomt", "hf:tue-mps/tiny_eomt@0123abcd"):
        loaded = build_model(spelled)
        assert loaded.config.name == "tiny_eomt" and loaded.config.class_names == direct.config.class_names
        ours, theirs = loaded.model.state_dict(), direct.model.state_dict()
        read = [k for k in ours if not k.startswith(("policies.", "gates."))]  # untrained parts are drawn afresh
        assert read and all(torch.equal(ours[k], theirs[k]) for k in read)
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache .* and offline"):
        build_model("hf:tue-mps/not_there")
    with pytest.raises(CheckpointError, match="hf:ORG/NAME"):
        build_model("hf:../etc")
    r = CliRunner().invoke(app, ["run", str(IMAGE), "--model", "hf:tue-mps/tiny_eomt", "--window", "0", "--size", "64",
                                 "--device", "cpu", "--no-animation", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output


def save_tiny_eomt_dinov3(folder: Path, seed: int = 0) -> torch.nn.Module:
    """A tiny EoMT on a DINOv3 backbone (rotary positions, registers, layer scale, q and v biases), built with
    transformers' own config class and saved with save_pretrained."""
    from transformers import EomtDinov3Config, EomtDinov3ForUniversalSegmentation, EomtImageProcessor

    torch.manual_seed(seed)
    config = EomtDinov3Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=256,
                              patch_size=16, image_size=CROP, num_register_tokens=4, num_queries=6, num_blocks=2,
                              num_upscale_blocks=2, num_labels=len(LABELS), id2label=LABELS,
                              label2id={v: k for k, v in LABELS.items()})
    model = EomtDinov3ForUniversalSegmentation(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.3)
            elif "bias" in name or "lambda1" in name:
                p.normal_(0.0, 0.2)
        model.attn_mask_probs.zero_()
    model.save_pretrained(folder, safe_serialization=True)
    EomtImageProcessor(size={"shortest_edge": CROP, "longest_edge": CROP}, image_mean=[0.5, 0.45, 0.4],
                       image_std=[0.25, 0.2, 0.3]).save_pretrained(folder)
    return model


def test_a_transformers_eomt_dinov3_folder_gives_transformers_own_scores(tmp_path: Path) -> None:
    """Rotary positions, registers, layer scale and the q/v biases read from the folder: with reduction off the
    per-pixel scores are transformers' own, at the crop and at another size (rotary positions follow the grid)."""
    from transformers import EomtImageProcessor

    reference = save_tiny_eomt_dinov3(tmp_path / "eomt3")
    loaded = build_model("demo", weights=str(tmp_path / "eomt3"))
    model = loaded.model.eval()
    assert model.rope is not None and loaded.config.class_names == ("road", "building", "sky")
    mean, std = torch.tensor([0.5, 0.45, 0.4]).view(1, 3, 1, 1), torch.tensor([0.25, 0.2, 0.3]).view(1, 3, 1, 1)
    processor = EomtImageProcessor.from_pretrained(tmp_path / "eomt3")
    x = _pixels()
    with torch.no_grad():
        out = model(x, setting=model.default_setting().plain())
        ours = model.pixel_logits(out, (CROP, CROP))
        ref = processor.post_process_semantic_segmentation(reference(pixel_values=(x - mean) / std),
                                                           target_sizes=[(CROP, CROP)] * 2,
                                                           return_segmentation_scores=True)
    theirs = torch.stack([r.segmentation_scores for r in ref])
    assert (ours - theirs).abs().max().item() < 1e-4
    assert torch.equal(ours.argmax(1), torch.stack([r.segmentation for r in ref]))
    assert theirs.argmax(1).unique().numel() > 1


def test_every_method_keeps_the_accounting_on_a_transformers_eomt_dinov3_folder(tmp_path: Path) -> None:
    """Supertokens (dcts, uniform policy: the folder has no trained dCTS policy or gates), merging and pruning on a
    rotary backbone with EoMT's queries: every trace accounts for every patch once."""
    save_tiny_eomt_dinov3(tmp_path / "eomt3")
    r = CliRunner().invoke(app, ["compare", str(IMAGE), "--weights", str(tmp_path / "eomt3"), "--methods",
                                 "dcts,tome:r=2,algm,evit,hourglass", "--policy", "uniform", "--size", "96", "--window",
                                 "0", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    from tokenscope.trace.trace import TRACE_JSON, Trace

    traces = [Trace.load(p.parent) for p in sorted((tmp_path / "o").rglob(TRACE_JSON))]
    assert len(traces) == 6
    for t in traces:
        t.assert_consistent()


def _original_name(key: str) -> str:
    """transformers' EoMT-DINOv3 name -> the name EoMT's own DINOv3 releases use (written here for the test)."""
    import re

    rules = ((r"embeddings\.cls_token", "encoder.backbone.patch_embed.cls_token"),
             (r"embeddings\.register_tokens", "encoder.backbone.patch_embed.register_tokens"),
             (r"embeddings\.patch_embeddings\.(.+)", r"encoder.backbone.patch_embed.patch_embeddings.\1"),
             (r"layers\.(\d+)\.(.+)", r"encoder.backbone.blocks.\1.\2"), (r"layernorm\.(.+)", r"encoder.backbone.norm.\1"),
             (r"query\.weight", "q.weight"), (r"class_predictor\.(.+)", r"class_head.\1"),
             (r"mask_head\.fc(\d)\.(.+)", lambda m: f"mask_head.{2 * (int(m.group(1)) - 1)}.{m.group(2)}"),
             (r"upscale_block\.block\.(\d+)\.layernorm2d\.(.+)", r"upscale.\1.norm.\2"),
             (r"upscale_block\.block\.(\d+)\.(.+)", r"upscale.\1.\2"), (r"attn_mask_probs", "attn_mask_probs"))
    for pattern, target in rules:
        if re.fullmatch(pattern, key):
            return "network." + re.sub(pattern, target, key)
    raise AssertionError(key)


def test_an_eomt_dinov3_release_of_deltas_needs_its_backbone_and_then_gives_transformers_scores(tmp_path: Path) -> None:
    """EoMT publishes its DINOv3 models as deltas to DINOv3's backbone weights (pytorch_model.bin, its own names):
    without --backbone one line says what to pass; with the DINOv3 folder the model is the full one, whose scores
    transformers gives."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel, EomtImageProcessor

    full = save_tiny_eomt_dinov3(tmp_path / "full")
    torch.manual_seed(5)
    base = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                                          intermediate_size=256, image_size=CROP, patch_size=16,
                                          num_register_tokens=4)).eval()
    base.save_pretrained(tmp_path / "dinov3", safe_serialization=True)
    base_state = {}
    for key, value in base.state_dict().items():  # DINOv3ViTModel's names -> EoMT-DINOv3's
        key = key.removeprefix("model.")
        key = "layers." + key[len("layer."):] if key.startswith("layer.") else key
        base_state["layernorm." + key[len("norm."):] if key.startswith("norm.") else key] = value
    delta = {}
    for key, value in full.state_dict().items():
        if key.startswith("criterion."):
            continue
        delta[_original_name(key)] = value - base_state[key] if key in base_state else value
    release = tmp_path / "release"
    release.mkdir()
    torch.save(delta, release / "pytorch_model.bin")
    (release / "config.json").write_text(json.dumps({
        "num_labels": len(LABELS), "id2label": {str(k): v for k, v in LABELS.items()}, "image_size": CROP,
        "num_queries": 6, "num_blocks": 2, "num_upscale_blocks": 2}))
    shutil.copy(tmp_path / "full" / "preprocessor_config.json", release)
    with pytest.raises(CheckpointError, match="stores its backbone as deltas .*pass --backbone"):
        build_model("demo", weights=str(release))
    loaded = build_model("demo", weights=str(release), backbone=str(tmp_path / "dinov3"))
    model = loaded.model.eval()
    mean, std = torch.tensor([0.5, 0.45, 0.4]).view(1, 3, 1, 1), torch.tensor([0.25, 0.2, 0.3]).view(1, 3, 1, 1)
    processor = EomtImageProcessor.from_pretrained(tmp_path / "full")
    x = _pixels()
    with torch.no_grad():
        ours = model.pixel_logits(model(x, setting=model.default_setting().plain()), (CROP, CROP))
        ref = processor.post_process_semantic_segmentation(full(pixel_values=(x - mean) / std),
                                                           target_sizes=[(CROP, CROP)] * 2,
                                                           return_segmentation_scores=True)
    theirs = torch.stack([r.segmentation_scores for r in ref])
    # base + (full - base) is the full weight to the last bit or two of float32, no closer: 1e-3, equal labels
    assert (ours - theirs).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(1), theirs.argmax(1)) and theirs.argmax(1).unique().numel() > 1
    r = CliRunner().invoke(app, ["run", str(IMAGE), "--weights", str(release), "--backbone", str(tmp_path / "full"),
                                 "--device", "cpu", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "not a DINOv3 ViT" in r.output and "Traceback" not in r.output
