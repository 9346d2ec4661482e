"""Your own ViT segmenter through the public way in: ts.from_timm(vit, decoder=...), traced,
compared and saved as a checkpoint the command line runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from typer.testing import CliRunner

import tokenscope as ts
from tokenscope.cli import app

IMAGE = Path(__file__).resolve().parents[1] / "sample_images" / "street_5000001.png"


def _vit(**kw: object) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=128, embed_dim=64,
                             depth=4, num_heads=2, **kw).eval()


def test_a_timm_vit_with_a_trained_linear_head_traces_and_saves_a_checkpoint_the_cli_runs(tmp_path: Path) -> None:
    vit = _vit(reg_tokens=2)
    head = nn.Linear(64, 3)
    model = ts.from_timm(vit, decoder=head, class_names=("sky", "road", "car"), mean=(0.5,) * 3, std=(0.5,) * 3,
                         device="cpu")
    tr = ts.trace(model, str(IMAGE), size=128)
    tr.assert_consistent()
    assert model.trained == {"backbone": True, "decoder": True, "exits": False, "policy": False}
    with torch.no_grad():  # the model is the user's network: its plain forward is timm's plus the head
        x = torch.rand(1, 3, 128, 128)
        ours = model.module((x - 0.5) / 0.5 * 0.5 + 0.5, setting=model.setting.plain()).token_logits
        feats = vit.forward_features((x - 0.5) / 0.5)[:, vit.num_prefix_tokens:]
        assert torch.allclose(ours, head(feats), atol=1e-5)
    saved = model.save(tmp_path / "mine")
    assert saved.with_suffix(".json").is_file()
    again = ts.load_model(weights=str(tmp_path / "mine.json"), device="cpu", policy="none", exits=False)
    with torch.no_grad():
        assert torch.equal(again.module(x).token_logits, model.module(x).token_logits)
    r = CliRunner().invoke(app, ["compare", str(IMAGE), "--weights", str(tmp_path / "mine.json"), "--size", "128",
                                 "--methods", "tome:r=4,evit", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output


def test_a_decoder_module_of_your_own_is_traced_but_not_saved(tmp_path: Path) -> None:
    class Head(nn.Module):
        num_classes = 4

        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(64, 4)

        def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
            return self.proj(tokens.tanh())

    model = ts.from_timm(_vit(), decoder=Head(), device="cpu", method="tome:r=3")
    tr = ts.trace(model, str(IMAGE), size=128)
    tr.assert_consistent()
    assert tr.meta.method == "tome:r=3" and tr.has_merges
    with pytest.raises(ts.ConfigError, match="your own module"):
        model.save(tmp_path / "x")


@pytest.mark.parametrize("args, words", [
    (("not a model",), "expected a timm VisionTransformer module"),
    ((nn.Linear(3, 3),), "not a plain timm VisionTransformer"),
    ((_vit(),), "give num_classes"),
    ((_vit(), ), "decoder=Linear"),
])
def test_a_wrong_object_is_one_line_saying_what_to_pass(args: tuple, words: str) -> None:
    kwargs = {"decoder": nn.Linear(32, 3)} if words == "decoder=Linear" else {}
    with pytest.raises(ts.TokenscopeError, match=words) as err:
        ts.from_timm(*args, device="cpu", **kwargs) if kwargs or words != "give num_classes" else \
            ts.from_timm(*args, decoder="mask", device="cpu")
    assert "\n" not in str(err.value)
