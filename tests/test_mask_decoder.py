"""The mask-transformer decoder inside STEP: it sees every token, exited ones included, while the
encoder's last blocks really see fewer; exited tokens keep their gate's prediction; FLOPs are exact."""

from __future__ import annotations

import numpy as np
import torch

from conftest import TINY, setting
from tokenscope.models.checkpoints import LoadedModel
from tokenscope.models.cost import measure_flops
from tokenscope.models.step_vit import StepViT
from tokenscope.trace.capture import TraceCapture, images_to_tensor
from tokenscope.data.images import prepare_image

MASK = TINY.replace(name="tiny-mask", decoder="mask", decoder_layers=1)


def _model(seed: int = 0) -> StepViT:
    torch.manual_seed(seed)
    return StepViT(MASK).eval()


def _flat_image(h: int = 96, w: int = 128) -> torch.Tensor:
    x = torch.full((1, 3, h, w), 0.5)
    x[:, :, h // 2:] = 0.2
    return x


def test_mask_decoder_sees_exited_tokens_as_context_and_exited_tokens_keep_their_gate_prediction() -> None:
    model = _model()
    s = setting(model, policy="uniform", exits=True, exit_threshold=float("inf"))
    conf: list[torch.Tensor] = []
    hook = model.gates["1"].register_forward_hook(lambda m, args, out: conf.append(out.confidence[out.token_ids >= 0]))
    with torch.no_grad():
        model(_flat_image(), setting=s)
    hook.remove()
    s = setting(model, s, exit_threshold=float(conf[0].median()))  # about half the tokens leave at the first gate
    seen: dict[str, object] = {}
    model.decoder.register_forward_hook(lambda m, args, out: seen.update(tokens=args[0].shape[1], valid=args[1]))
    last_in: list[int] = []
    model.blocks[-1].register_forward_pre_hook(lambda m, args: last_in.append(args[0].shape[1]))
    gate_logits: dict[int, torch.Tensor] = {}
    for k, gate in model.gates.items():
        gate.register_forward_hook(lambda m, args, out, k=int(k): gate_logits.update({k: (out.logits, out.token_ids, out.exits)}))
    with torch.no_grad():
        out = model(_flat_image(), setting=s)
    t = out.partitions[0].num_tokens
    exited = (out.exit_block[0] < model.depth)
    assert exited.any() and not exited.all()
    assert seen["tokens"] == t and bool(seen["valid"].all())  # type: ignore[union-attr]
    assert not last_in or last_in[-1] - model.num_prefix_tokens < t  # the encoder really dropped tokens
    for k, (logits, ids, exits) in gate_logits.items():
        for slot in torch.nonzero(exits[0]).flatten().tolist():
            tok = int(ids[0, slot])
            assert torch.allclose(out.token_logits[0, tok], logits[0, slot].to(out.token_logits.dtype))


def test_mask_decoder_without_reduction_equals_a_plain_forward_over_all_patches() -> None:
    model = _model(1)
    x = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, setting=setting(model, policy="none", exits=False))
        emb, _ = model.embed((x - model.pixel_mean) / model.pixel_std, out.partitions)
        seq = torch.cat([model.cls_token.expand(2, -1, -1) + model.embed.patch_pos_grid((4, 5))[1], emb.tokens], dim=1)
        for blk in model.blocks:
            seq = blk(seq)
        ref = model.decoder(model.norm(seq)[:, 1:])
    assert torch.allclose(out.token_logits, ref, atol=1e-5)


def test_mask_decoder_flops_equal_torch_flop_counter() -> None:
    model = _model(2)
    loaded = LoadedModel(model, MASK, {"backbone": True, "decoder": True, "exits": True, "policy": True}, "t", "t")
    rng = np.random.default_rng(0)
    img = np.full((96, 144, 3), 0.4, np.float32)
    img[40:80, 60:120] = rng.random((40, 60, 3))
    im = prepare_image(img, "x")
    for policy, exits in (("none", False), ("uniform", True)):
        s = setting(model, policy=policy, exits=exits, exit_threshold=0.26)
        trace = TraceCapture(loaded, torch.device("cpu"), s)([im])[0]
        x, _ = images_to_tensor([im], torch.device("cpu"))
        with torch.no_grad():
            total, per_module, _ = measure_flops(lambda: model(x, setting=s))
        assert trace.meta.flops["total"] == total, policy
        assert trace.meta.flops["decoder"] == per_module["StepViT.decoder"], policy
