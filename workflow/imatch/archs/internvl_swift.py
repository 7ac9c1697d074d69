"""ms-swift plug-in: model type and template `internvl2_5_hf`, the paper's InternVL2.5 input on the native class.

The paper fine-tuned the original (remote-code) `OpenGVLab/InternVL2_5-8B-MPO` with ms-swift, whose
`internvl2_5` template encodes every query as the original chat code does. The workflow loads the
official native conversion (`-hf`, `InternVLForConditionalGeneration`), for which ms-swift offers
only `internvl_hf`, and that template differs from the original in what the model is shown
(tests/test_fidelity.py measures each against the original code):
- no system turn, where InternVL2.5 always has one (its conversation template's system message,
  which is also ms-swift's `internvl2_5` default system);
- images tiled by the native image processor (torchvision resampling by default), where the
  original tiles with PIL (`dynamic_preprocess` + bicubic resize + ImageNet normalisation).
This template is ms-swift's own `internvl2_5` encoding (Internvl2Template: `<img>`, the image's
`<IMG_CONTEXT>` tokens, `</img>\\n`; up to $MAX_NUM tiles plus a thumbnail, default 12 as in
ms-swift) with the tile size taken from the checkpoint, and the native model's forward of
`internvl_hf`. The loader keeps the tokenizer the checkpoint declares (`tokenizer_kwargs`): with
transformers 5's defaults every answer letter would be another token than the original's.

Load with `swift sft ... --external_plugins <this file> --model_type internvl2_5_hf --template internvl2_5_hf`.
"""

from __future__ import annotations

from swift.model import Model, ModelGroup, ModelMeta, register_model
from swift.model.model_arch import ModelArch
from swift.model.models.internlm import InternVLHfLoader
from swift.template import register_template
from swift.template.templates.internvl import Internvl2Template, InternvlhfTemplate
from swift.template.templates.utils import ChatmlTemplateMeta

MODEL_TYPE = TEMPLATE_TYPE = "internvl2_5_hf"
# InternVL2.5's conversation template `internvl2_5` (OpenGVLab/InternVL, internvl/conversation.py),
# and ms-swift's `internvl2_5` default system: the system turn every original InternVL2.5 query has.
SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


def tokenizer_kwargs(model_dir) -> dict:
    """Load options that keep the tokenizer the files declare. The -hf conversion writes InternLM2's
    sentencepiece vocabulary as a `LlamaTokenizer` whose tokenizer.json says Metaspace with
    `prepend_scheme: never` (no space before the first word); transformers 5 rebuilds that
    pre-tokenizer from the class defaults (`first`) unless told `add_prefix_space=False`, and then
    every answer letter becomes `▁a`.. (or two tokens) instead of the original's `a`.."""
    import json
    from pathlib import Path

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return {}
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    never = any(p.get("type") == "Metaspace" and p.get("prepend_scheme") == "never" for p in parts)
    return {"add_prefix_space": False} if never else {}


class InternVL25HfLoader(InternVLHfLoader):
    """The native class (as ms-swift's `internvl`), no remote code, the tokenizer as declared."""

    default_trust_remote_code = False

    def get_processor(self, model_dir, config):
        from transformers import AutoProcessor

        kwargs = tokenizer_kwargs(model_dir)
        processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=False, **kwargs)
        if kwargs:  # the fix took: no space is prepended to a bare word
            pre = processor.tokenizer.backend_tokenizer.pre_tokenizer
            if pre.pre_tokenize_str("a")[0][0] != "a":
                raise RuntimeError(f"{model_dir}: tokenizer still prepends a space ({pre}); answer ids would be wrong")
        return processor


class InternVL25HfTemplate(Internvl2Template):
    """ms-swift's `internvl2_5` encoding, the native model's forward."""

    def init_env_args(self):
        super().init_env_args()  # max_num from $MAX_NUM (default 12), as ms-swift's internvl2_5
        # the tile size and tokens per tile of this checkpoint (448 and 256 for the real model)
        self.input_size = self.processor.image_processor.size["height"]
        self.num_image_token = self.processor.image_seq_length

    _post_encode = InternvlhfTemplate._post_encode


register_model(
    ModelMeta(
        MODEL_TYPE,
        [ModelGroup([Model(hf_model_id="OpenGVLab/InternVL2_5-8B-MPO-hf")])],
        InternVL25HfLoader,
        template=TEMPLATE_TYPE,
        architectures=["InternVLForConditionalGeneration"],
        model_arch=ModelArch.llava_hf,
        is_multimodal=True,  # only set automatically for ms-swift's own MLLM types
        tags=["vision"],
        requires=["transformers>=5.0"],
    ),
    exist_ok=True,
)
register_template(ChatmlTemplateMeta(TEMPLATE_TYPE, template_cls=InternVL25HfTemplate, default_system=SYSTEM),
                  exist_ok=True)
