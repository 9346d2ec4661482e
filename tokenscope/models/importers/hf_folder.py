"""Hugging Face model folders (`save_pretrained`, the hub's snapshots) as tokenscope models.

A folder holding `config.json` + `model.safetensors` (+ `preprocessor_config.json`) is read without
transformers and without running any code: the config and preprocessor files are data (checked by
schema), the tensors come from safetensors. Only `model_type` `eomt` (transformers'
`EomtForUniversalSegmentation`, EoMT on a DINOv2 ViT) is read; its names are mapped onto the
original EoMT layout (models/importers/eomt.py), which then builds the same StepViT as EoMT's own
checkpoints:

| transformers | EoMT's original |
|---|---|
| `embeddings.{cls_token, register_tokens}` | `backbone.{cls_token, reg_token}` |
| `embeddings.patch_embeddings.projection.*` | `backbone.patch_embed.proj.*` |
| `embeddings.position_embeddings.weight` (N, D) | `backbone.pos_embed` (1, N, D) |
| `layers.i.attention.{q,k,v}_proj.*` | `backbone.blocks.i.attn.qkv.*` (q, k, v stacked) |
| `layers.i.attention.out_proj.*`, `layer_scale{1,2}.lambda1` | `attn.proj.*`, `ls{1,2}.gamma` |
| `layers.i.{norm1, norm2, mlp.fc1, mlp.fc2}.*`, `layernorm.*` | the same under `blocks.i.`, `backbone.norm.*` |
| `query.weight`, `class_predictor.*`, `mask_head.fc{1,2,3}.*` | `q.weight`, `class_head.*`, `mask_head.{0,2,4}.*` |
| `upscale_block.block.i.{conv1, conv2, layernorm2d}.*` | `upscale.i.{conv1, conv2, norm}.*` |

Class names come from `id2label`, normalisation from the preprocessor file (`image_mean`,
`image_std`), heads and LayerNorm epsilon from the config. Masked attention is off at inference, as
the released models run.

`model_type` `eomt_dinov3` (`EomtDinov3ForUniversalSegmentation`) is EoMT on a DINOv3 ViT: rotary
positions (models/rotary.py), 4 registers, layer scale, q and v biases. Its backbone becomes timm's
DINOv3 EVA architecture (`vit_*_patch16_dinov3_qkvb`, sized by the config): `q_proj`/`k_proj`/`v_proj`
stacked into `qkv` with the q and v biases as `q_bias`/`v_bias` (no key bias, as the config says),
`o_proj` as `proj`, `layer_scale{1,2}.lambda1` as `gamma_{1,2}`, `mlp.up_proj`/`down_proj` as
`mlp.fc1`/`fc2`, the patch embedding `embeddings.patch_embeddings`; the head maps as above. A gated
(SwiGLU) MLP, a key bias or a RoPE other than the default are refused in one line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from tokenscope.errors import CheckpointError, TokenscopeError
from tokenscope.models.importers.eomt import BACKBONE, describe_eomt, eomt_to_stepvit
from tokenscope.models.importers.segmenter import ImportedSegmenter
from tokenscope.schema import check_fields, read_json

CONFIG_FIELDS = {
    "model_type": str, "hidden_size": int, "num_hidden_layers": int, "num_attention_heads": int, "patch_size": int,
    "image_size": int, "num_register_tokens": int, "num_queries": int, "num_blocks": int, "num_upscale_blocks": int,
    "layer_norm_eps": float, "hidden_act": str, "use_swiglu_ffn": bool, "id2label": dict[str, str], "num_labels": int,
}
PREPROCESSOR_FIELDS = {"image_mean": list[float], "image_std": list[float]}
MAX_WEIGHTS_BYTES = 64 * 2**30


def is_hf_folder(path: Path) -> bool:
    """A folder holding a model's config.json and its safetensors weights."""
    return path.is_dir() and (path / "config.json").is_file()


def _rename(key: str) -> str | None:
    """The original EoMT name of one transformers tensor (q/k/v are stacked separately); None: skip."""
    rules = (
        (r"embeddings\.cls_token", BACKBONE + "cls_token"),
        (r"embeddings\.register_tokens", BACKBONE + "reg_token"),
        (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", BACKBONE + r"patch_embed.proj.\1"),
        (r"layers\.(\d+)\.attention\.out_proj\.(weight|bias)", BACKBONE + r"blocks.\1.attn.proj.\2"),
        (r"layers\.(\d+)\.layer_scale(\d)\.lambda1", BACKBONE + r"blocks.\1.ls\2.gamma"),
        (r"layers\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)", BACKBONE + r"blocks.\1.\2.\3"),
        (r"layernorm\.(weight|bias)", BACKBONE + r"norm.\1"),
        (r"query\.weight", "network.q.weight"),
        (r"class_predictor\.(weight|bias)", r"network.class_head.\1"),
        (r"upscale_block\.block\.(\d+)\.(conv1|conv2)\.(weight|bias)", r"network.upscale.\1.\2.\3"),
        (r"upscale_block\.block\.(\d+)\.layernorm2d\.(weight|bias)", r"network.upscale.\1.norm.\2"),
        (r"attn_mask_probs", "network.attn_mask_probs"),
    )
    for pattern, target in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key)
    found = re.fullmatch(r"mask_head\.fc(\d)\.(weight|bias)", key)
    if found:
        return f"network.mask_head.{2 * (int(found.group(1)) - 1)}.{found.group(2)}"
    return None


DINOV3_FIELDS = {"intermediate_size": int, "query_bias": bool, "key_bias": bool, "value_bias": bool,
                 "use_gated_mlp": bool, "rope_parameters": dict[str, Any]}
DINOV3_RULES = (
    (r"embeddings\.patch_embeddings\.(weight|bias)", BACKBONE + r"patch_embed.proj.\1"),
    (r"layers\.(\d+)\.attention\.o_proj\.(weight|bias)", BACKBONE + r"blocks.\1.attn.proj.\2"),
    (r"layers\.(\d+)\.attention\.([qv])_proj\.bias", BACKBONE + r"blocks.\1.attn.\2_bias"),
    (r"layers\.(\d+)\.layer_scale(\d)\.lambda1", BACKBONE + r"blocks.\1.gamma_\2"),
    (r"layers\.(\d+)\.mlp\.up_proj\.(weight|bias)", BACKBONE + r"blocks.\1.mlp.fc1.\2"),
    (r"layers\.(\d+)\.mlp\.down_proj\.(weight|bias)", BACKBONE + r"blocks.\1.mlp.fc2.\2"),
)
"""transformers' DINOv3 names that differ from its DINOv2 EoMT's, as timm's DINOv3 EVA names them."""


def dinov3_backbone(config: dict[str, Any]) -> tuple[str, dict[str, Any], int]:
    """timm's DINOv3 EVA architecture sized by an eomt_dinov3 config, and the native grid side."""
    dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    patch, size = int(config.get("patch_size", 16)), int(config.get("image_size", 640))
    rope = config.get("rope_parameters") or {}
    kwargs = {"patch_size": patch, "embed_dim": dim, "depth": int(config["num_hidden_layers"]), "num_heads": heads,
              "mlp_ratio": int(config.get("intermediate_size", 4 * dim)) / dim,
              "num_reg_tokens": int(config.get("num_register_tokens", 4)),
              "rope_temperature": float(rope.get("rope_theta", 100.0))}
    return "vit_small_patch16_dinov3_qkvb", kwargs, size // patch


def to_eomt_layout(tensors: dict[str, torch.Tensor], source: str, dinov3: bool = False) -> dict[str, torch.Tensor]:
    """transformers' EoMT names -> the original EoMT layout (see the module docstring); with `dinov3`,
    the backbone's tensors under timm's DINOv3 EVA names."""
    state: dict[str, torch.Tensor] = {}
    unknown = []
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        key = key.removeprefix("model.")
        if key.startswith("criterion."):
            continue
        renamed = next((re.sub(p, t, key) for p, t in DINOV3_RULES if re.fullmatch(p, key)), None) if dinov3 else None
        if renamed is not None:
            state[renamed] = value
            continue
        found = re.fullmatch(r"layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)", key)
        if found:
            qkv.setdefault(f"{found.group(1)}.{found.group(3)}", {})[found.group(2)] = value
            continue
        if key == "embeddings.position_embeddings.weight" and not dinov3:  # DINOv3 has rotary positions instead
            state[BACKBONE + "pos_embed"] = value.unsqueeze(0)
            continue
        name = _rename(key)
        if name is None:
            unknown.append(key)
        else:
            state[name] = value
    for where, parts in qkv.items():
        if dinov3 and where.endswith(".bias"):
            unknown.append(f"layers.{where.split('.')[0]}.attention.k_proj.bias")  # a key bias: not EoMT-DINOv3's
            continue
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{source}: layer {where.split('.')[0]} lacks one of its q/k/v projections")
        block, kind = where.split(".")
        state[f"{BACKBONE}blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unknown:
        kind = "an EoMT-DINOv3" if dinov3 else "an EoMT"
        raise CheckpointError(f"{source}: {len(unknown)} weights {kind} model does not have (e.g. "
                              f"{', '.join(unknown[:3])})")
    return state


DELTA_RULES = (
    (r"encoder\.backbone\.patch_embed\.cls_token", "embeddings.cls_token"),
    (r"encoder\.backbone\.patch_embed\.register_tokens", "embeddings.register_tokens"),
    (r"encoder\.backbone\.patch_embed\.patch_embeddings\.(weight|bias)", r"embeddings.patch_embeddings.\1"),
    (r"encoder\.backbone\.blocks\.(\d+)\.(.+)", r"layers.\1.\2"),
    (r"encoder\.backbone\.norm\.(weight|bias)", r"layernorm.\1"),
    (r"q\.weight", "query.weight"),
    (r"class_head\.(weight|bias)", r"class_predictor.\1"),
    (r"mask_head\.0\.(weight|bias)", r"mask_head.fc1.\1"),
    (r"mask_head\.2\.(weight|bias)", r"mask_head.fc2.\1"),
    (r"mask_head\.4\.(weight|bias)", r"mask_head.fc3.\1"),
    (r"upscale\.(\d+)\.(conv1|conv2)\.(weight|bias)", r"upscale_block.block.\1.\2.\3"),
    (r"upscale\.(\d+)\.norm\.(weight|bias)", r"upscale_block.block.\1.layernorm2d.\2"),
    (r"(?:encoder\.)?attn_mask_probs", "attn_mask_probs"),
)
"""EoMT's own names in its DINOv3 releases -> transformers' EoMT-DINOv3 names (after `network.`)."""
BACKBONE_FIELDS = {"hidden_size": int, "num_hidden_layers": int, "num_attention_heads": int, "intermediate_size": int,
                   "num_register_tokens": int, "patch_size": int, "rope_theta": float, "key_bias": bool,
                   "use_gated_mlp": bool}


def is_delta_release(folder: Path) -> bool:
    """An EoMT-DINOv3 release as EoMT publishes it: config.json and pytorch_model.bin, no safetensors."""
    return (folder / "pytorch_model.bin").is_file() and not (folder / "model.safetensors").is_file()


def _backbone_state(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A transformers DINOv3ViTModel folder: its config and its tensors under EoMT-DINOv3's names."""
    config_path = folder / "config.json"
    if not is_hf_folder(folder) or not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"--backbone {folder}: not a DINOv3 model folder (config.json + model.safetensors)")
    config = read_json(config_path, "config.json", CheckpointError)
    check_fields(config, BACKBONE_FIELDS, config_path, error=CheckpointError)
    if config.get("model_type") not in (None, "dinov3_vit"):
        raise CheckpointError(f"--backbone {folder}: a model of type {config.get('model_type')!r}, not a DINOv3 ViT "
                              "(model_type dinov3_vit)")
    tensors = _safetensors(folder / "model.safetensors")
    state: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        key = key.removeprefix("model.")
        if key == "embeddings.mask_token":
            continue
        key = re.sub(r"^layer\.(\d+)\.", r"layers.\1.", key)
        key = re.sub(r"^norm\.", "layernorm.", key)
        state[key] = value
    return config, state


def read_delta_release(folder: Path, release: dict[str, Any], backbone: Path | None
                       ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An EoMT-DINOv3 release whose backbone tensors are deltas to DINOv3's: the backbone's weights plus the
    deltas, under transformers' names, and the eomt_dinov3 config they make (the backbone's sizes, the
    release's head), as transformers' own conversion assembles them."""
    if backbone is None:
        raise CheckpointError(f"{folder}: an EoMT-DINOv3 release stores its backbone as deltas to DINOv3's weights; "
                              "pass --backbone (the DINOv3 model folder it was trained from, or "
                              "hf:facebook/dinov3-vitl16-pretrain-lvd1689m)")
    from tokenscope.models.importers.safe_pickle import read_pickled_checkpoint

    obj = read_pickled_checkpoint(folder / "pytorch_model.bin")
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{folder / 'pytorch_model.bin'}: not a table of tensors")
    base_config, state = _backbone_state(backbone)
    unknown = []
    for key, delta in obj.items():
        short = str(key).removeprefix("network.")
        if short.startswith(("encoder.pixel_mean", "encoder.pixel_std", "criterion.")):
            continue
        name = next((re.sub(p, t, short) for p, t in DELTA_RULES if re.fullmatch(p, short)), None)
        if name is None:
            unknown.append(str(key))
        elif name in state:
            if tuple(state[name].shape) != tuple(delta.shape):
                raise CheckpointError(f"{folder}: {key} is {tuple(delta.shape)} but the backbone's {name} is "
                                      f"{tuple(state[name].shape)}: --backbone is not the one this release was trained from")
            state[name] = state[name].to(delta.dtype) + delta
        else:
            state[name] = delta
    if unknown:
        raise CheckpointError(f"{folder}: {len(unknown)} weights an EoMT-DINOv3 release does not have (e.g. "
                              f"{', '.join(unknown[:3])})")
    config = {k: v for k, v in release.items() if k != "backbone"}
    if "num_labels" not in config and isinstance(config.get("num_classes"), int):
        config["num_labels"] = config.pop("num_classes")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_register_tokens",
                "key_bias", "use_gated_mlp", "patch_size"):
        if key in base_config:
            config[key] = base_config[key]
    config.setdefault("image_size", base_config.get("image_size", 640))
    config["rope_parameters"] = {"rope_theta": float(base_config.get("rope_theta", 100.0)), "rope_type": "default"}
    config["model_type"] = "eomt_dinov3"
    return config, state


def _safetensors(weights: Path) -> dict[str, torch.Tensor]:
    if weights.stat().st_size > MAX_WEIGHTS_BYTES:
        raise CheckpointError(f"{weights}: larger than any EoMT model ({weights.stat().st_size:,} bytes)")
    try:
        from safetensors.torch import load_file

        return load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for damaged headers
        raise CheckpointError(f"{weights}: cannot read weights ({str(exc).splitlines()[0][:160]})") from None


def read_hf_folder(folder: Path, name: str | None = None, backbone: Path | None = None) -> ImportedSegmenter:
    """A transformers model folder as an ImportedSegmenter (config, StepViT-named tensors, notes); an
    EoMT-DINOv3 release of deltas with the DINOv3 `backbone` folder they add to."""
    config_path = folder / "config.json"
    config = read_json(config_path, "config.json", CheckpointError)
    tensors: dict[str, torch.Tensor] | None = None
    weights = folder / "model.safetensors"
    if is_delta_release(folder):
        config, tensors = read_delta_release(folder, config, backbone)
        weights = folder / "pytorch_model.bin"
    elif backbone is not None:
        raise CheckpointError(f"--backbone is for EoMT-DINOv3 releases of deltas; {folder} holds its whole model")
    model_type = config.get("model_type")
    if model_type not in ("eomt", "eomt_dinov3"):
        raise CheckpointError(f"{folder}: a Hugging Face folder of model_type {model_type!r}; tokenscope reads "
                              "model_type 'eomt' and 'eomt_dinov3' (EoMT's) folders")
    dinov3 = model_type == "eomt_dinov3"
    check_fields(config, {**CONFIG_FIELDS, **(DINOV3_FIELDS if dinov3 else {})}, config_path, error=CheckpointError)
    if config.get("use_swiglu_ffn") or config.get("use_gated_mlp"):
        raise CheckpointError(f"{config_path}: a gated (SwiGLU) MLP; tokenscope reads EoMT's GELU MLP")
    if dinov3:
        rope = config.get("rope_parameters") or {}
        if config.get("key_bias") or (rope.get("rope_type") or "default") != "default":
            raise CheckpointError(f"{config_path}: a key bias or a {rope.get('rope_type')!r} RoPE; tokenscope reads "
                                  "EoMT-DINOv3's default RoPE without a key bias")
    if tensors is None:
        if not weights.is_file():
            raise CheckpointError(f"{folder}: no model.safetensors (sharded or .bin folders are not read; "
                                  "`save_pretrained(..., safe_serialization=True)` writes one)")
        tensors = _safetensors(weights)
    state = to_eomt_layout(tensors, str(weights), dinov3)
    overrides: dict[str, Any] = {}
    notes = ["masked attention off, as EoMT's released inference runs", f"read from the Hugging Face folder {folder}"]
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        doc = read_json(pre, "preprocessor_config.json", CheckpointError)
        check_fields(doc, PREPROCESSOR_FIELDS, pre, error=CheckpointError)
        if "image_mean" in doc and "image_std" in doc:
            overrides["pixel_mean"] = tuple(float(v) for v in doc["image_mean"])
            overrides["pixel_std"] = tuple(float(v) for v in doc["image_std"])
    else:
        notes.append("no preprocessor_config.json: ImageNet normalisation assumed (EoMT's)")
    labels = config.get("id2label") or {}
    try:
        ordered = [labels[str(i)] for i in range(len(labels))]
    except KeyError:
        raise CheckpointError(f"{config_path}: id2label does not name the classes 0..{len(labels) - 1}") from None
    try:
        described = describe_eomt(state, name or folder.name, str(folder), notes, overrides,
                                  dinov3_backbone(config) if dinov3 else None)
        heads = int(config.get("num_attention_heads", described.timm_kwargs["num_heads"]))
        eps = float(config.get("layer_norm_eps", 1e-6))
        described = described.replace(timm_kwargs={**described.timm_kwargs, "num_heads": heads}, norm_eps=eps)
        if ordered and len(ordered) == described.num_classes:  # the folder's own names win over a guess
            described = described.replace(class_names=tuple(ordered))
    except TokenscopeError:
        raise
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot describe this model ({exc})") from None
    return ImportedSegmenter(described, eomt_to_stepvit(state, str(folder)), "hf-eomt", str(weights), notes,
                             family="EoMT")


HUB_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "pytorch_model.bin")
"""What a model needs from its repository (an EoMT-DINOv3 release of deltas has pytorch_model.bin instead)."""


def hub_cache() -> Path:
    """The Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`."""
    import os

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def parse_hub_id(text: str) -> tuple[str, str]:
    """`hf:ORG/NAME[@REVISION]` -> (ORG/NAME, REVISION or main), or one line saying how to spell it."""
    spec = text.removeprefix("hf:")
    repo, _, revision = spec.partition("@")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo) or ".." in repo:
        raise CheckpointError(f"--model {text}: a Hugging Face model is named hf:ORG/NAME[@REVISION], e.g. "
                              "hf:tue-mps/ade20k_semantic_eomt_large_512")
    if revision and not re.fullmatch(r"[\w.-]+", revision):
        raise CheckpointError(f"--model {text}: the revision {revision!r} is not a branch, tag or commit")
    return repo, revision or "main"


def hub_snapshot(text: str, offline: bool) -> Path:
    """The folder of `hf:ORG/NAME[@REVISION]` in the hub cache (`refs/REVISION` names the snapshot, or the
    revision is a commit), downloaded through huggingface_hub when missing and not offline."""
    repo, revision = parse_hub_id(text)
    root = hub_cache() / f"models--{repo.replace('/', '--')}"
    ref = root / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    folder = root / "snapshots" / commit
    if (folder / "config.json").is_file() and any((folder / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")):
        return folder
    if offline:
        raise CheckpointError(f"--model {text}: not in the Hugging Face cache ({root}) and offline (TOKENSCOPE_OFFLINE); "
                              f"fetch {repo} ({', '.join(HUB_FILES)}) with network, or pass the folder as --weights")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, revision=revision, cache_dir=str(hub_cache()), allow_patterns=list(HUB_FILES)))
    except Exception as exc:  # noqa: BLE001 - network and hub errors come in many types
        raise CheckpointError(f"--model {text}: cannot download {repo}@{revision} ({str(exc).splitlines()[0][:160]})") \
            from None
