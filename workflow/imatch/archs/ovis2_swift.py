"""ms-swift 4.6 plug-in: model type and template `ovis2_hf` for the native Ovis2ForConditionalGeneration.

ms-swift only knows the remote-code Ovis2 (`ovis2`), which no longer loads on transformers 5. Load
with `swift sft ... --external_plugins <this file> --model_type ovis2_hf --template ovis2_hf`
(`--custom_register_path` is the 3.x alias). swift imports it by file path, also in dataloader
workers, so it imports nothing of imatch but the light `imatch.archs.ovis2` (the original's
tiling). Importing it twice (by path and as `imatch.archs.ovis2_swift`) is harmless: registration
is idempotent.

Two silent failures are guarded here (both leave training "working"):
1. The native vision model exposes no input embeddings, so `enable_input_require_grads` hooks
   nothing in the vision tower; with ms-swift's reentrant gradient checkpointing the ViT blocks
   then see inputs without grad and their LoRA weights never move. The loader makes the vision
   embeddings module the vision tower's "input embeddings", so the usual hook reaches it.
2. `<image>` is not one token in the real Ovis2-hf tokenizers. The template never tokenizes it:
   `replace_tag` emits a negative sentinel id, and `_encode` splices in each image's placeholder
   sequence (`<IMG_START>`, `<IMG_ATOM>` x tokens per crop, `<IMG_GRID>`, crops separated by
   `<IMG_COL>` / `<IMG_ROW>`, `<IMG_END>`).

Fidelity to the original Ovis2 (AIDC-AI/Ovis @ 52e5fdf, the code ms-swift's `ovis2` template ran
for the paper), where transformers' native port differs (tests/test_fidelity.py proves equality):
- the visual tokenizer reads the ViT's last block output *before* the final RMSNorm
  (`hidden_states[-1]`, not `post_trunk_norm`'s output): the loader makes that norm an identity;
- images are tiled as the original tiles them (`imatch.archs.ovis2.preprocess_image`: up to
  $MAX_PARTITION crops, default 9 as in ms-swift, aspect ratio kept and zero-padded, the whole image
  first), where the native processor squashes each tile and swaps rows and columns;
- pixels go through the PIL backend of the image processor (the original's CLIPImageProcessor).
"""

from __future__ import annotations

from types import MethodType
from typing import Any, Dict, List, Literal

import torch
from swift.model import (Model, ModelGroup, ModelLoader, ModelMeta, MultiModelKeys, register_model,
                         register_model_arch)
from swift.template import StdTemplateInputs, Template, register_template
from swift.template.templates.qwen import QwenTemplateMeta
from swift.template.utils import Context, findall
from swift.utils import get_env_args

from imatch.archs.ovis2 import DEFAULT_MAX_PARTITION, placeholder_tokens, preprocess_image

MODEL_TYPE = TEMPLATE_TYPE = ARCH_NAME = "ovis2_hf"
IMAGE_SENTINEL = -200  # the id the remote-code Ovis templates use for an image slot; never a real token
OVIS_SPECIALS = ["<IMG_ATOM>", "<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>"]


def _vision_input_embeddings(self) -> torch.nn.Module:
    """What feeds the ViT blocks (patch conv + RMSNorm + positions): the place to make inputs require grad."""
    return self.transformer.embeddings


def guard_vision_grads(model) -> None:
    """Bug 1: let `enable_input_require_grads` (model's or vision tower's) hook the vision embeddings."""
    vision = model.model.vision_tower
    vision.get_input_embeddings = MethodType(_vision_input_embeddings, vision)


def _identity(self, hidden_states):
    return hidden_states


def features_before_final_norm(model) -> None:
    """The original Ovis2 visual tokenizer takes the last ViT block's output before AIMv2's
    `post_trunk_norm`; the native Ovis2VisionTransformer normalises it (`rms_norm`). Make that
    norm an identity in place: its weight stays in the state dict (checkpoints keep their keys)
    but is frozen and unused."""
    norm = model.model.vision_tower.transformer.rms_norm
    norm.forward = MethodType(_identity, norm)
    for param in norm.parameters():
        param.requires_grad_(False)


class Ovis2HfLoader(ModelLoader):
    """Native class + AutoProcessor (PIL image backend), no remote code; the original's vision
    features (before the final norm)."""

    default_trust_remote_code = False

    def get_processor(self, model_dir, config):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model_dir, backend="pil", trust_remote_code=False)

    def get_model(self, model_dir, config, processor, model_kwargs):
        from transformers import Ovis2ForConditionalGeneration

        self.auto_model_cls = self.auto_model_cls or Ovis2ForConditionalGeneration
        model = super().get_model(model_dir, config, processor, model_kwargs)
        features_before_final_norm(model)
        guard_vision_grads(model)
        return model


class Ovis2HfTemplate(Template):
    """Qwen chat format; each image is `<image>` + newline, as in ms-swift's remote-code Ovis2 template."""

    placeholder_tokens = []  # set per instance from the tokenizer: image atom + indicator ids

    def init_env_args(self):
        super().init_env_args()
        # the same variable and default as ms-swift's own (remote-code) Ovis2 template
        self.max_partition = get_env_args("max_partition", int, DEFAULT_MAX_PARTITION)

    def _init_placeholder_tokens(self):
        # The base version reads processor.image_token ('<image>'), which is no token here (None).
        ids = self.tokenizer.convert_tokens_to_ids(OVIS_SPECIALS)
        self.placeholder_tokens = [i for i in ids if i is not None]

    def replace_tag(self, media_type: Literal["image", "video", "audio"], index: int,
                    inputs: StdTemplateInputs) -> List[Context]:
        if media_type == "image":
            return [[IMAGE_SENTINEL], "\n"]
        raise ValueError(f"{TEMPLATE_TYPE}: only images are supported, got {media_type!r}")

    def _encode(self, inputs: StdTemplateInputs) -> Dict[str, Any]:
        encoded = super()._encode(inputs)
        input_ids, labels, loss_scale = encoded["input_ids"], encoded["labels"], encoded.get("loss_scale")
        idx_list = findall(input_ids, [IMAGE_SENTINEL])
        images = inputs.images or []
        if len(idx_list) != len(images):
            raise ValueError(f"{len(idx_list)} image slots for {len(images)} images")
        if not images:
            return encoded
        image_processor = self.processor.image_processor
        side = image_processor.size["height"]
        per_crop = self.processor.image_seq_length
        expansions, pixel_values = [], []
        for image in images:
            values, grid = preprocess_image(image, image_processor, side=side, max_partition=self.max_partition)
            expansions.append(self.tokenizer.convert_tokens_to_ids(placeholder_tokens(grid, per_crop)))
            pixel_values.append(values)
        input_ids, labels, loss_scale = self._extend_tokens(input_ids, labels, loss_scale, idx_list,
                                                            lambda i: expansions[i])
        encoded["input_ids"], encoded["labels"], encoded["loss_scale"] = input_ids, labels, loss_scale
        encoded["pixel_values"] = torch.cat(pixel_values)
        return encoded


register_model_arch(
    MultiModelKeys(
        ARCH_NAME,
        language_model=["model.language_model", "lm_head"],
        aligner=["model.vision_tower.head_linear", "model.vision_tower.head_norm", "model.visual_embeddings_table"],
        vision_tower="model.vision_tower",
    ),
    exist_ok=True,
)
register_model(
    ModelMeta(
        MODEL_TYPE,
        [ModelGroup([Model(hf_model_id="thisisiron/Ovis2-2B-hf")])],
        Ovis2HfLoader,
        template=TEMPLATE_TYPE,
        model_arch=ARCH_NAME,
        architectures=["Ovis2ForConditionalGeneration"],
        is_multimodal=True,  # only set automatically for ms-swift's own MLLM types
        tags=["vision"],
        requires=["transformers>=5.0"],
    ),
    exist_ok=True,
)
register_template(QwenTemplateMeta(TEMPLATE_TYPE, template_cls=Ovis2HfTemplate), exist_ok=True)
