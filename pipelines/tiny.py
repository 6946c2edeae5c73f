"""Build the tiny random-weight presets of the MLCID construction models (same classes, tiny configs, offline).

Each preset is saved in its library's own format and loaded back by the stages through the same code path as
the real model: `instructblip/`, `owlv2/`, `grounding-dino/`, `depth-saliency/` are transformers folders
(`from_pretrained`), `sam/` is a segment-anything state dict plus a JSON file giving the geometry. Tokenizers are
built offline: the real CLIP BPE (shipped inside open_clip) for OWLv2, small Unigram (T5) and WordPiece (BERT)
vocabularies for InstructBLIP and Grounding DINO. Deterministic: the same seed gives the same weights.

CLI: `python -m pipelines.tiny --out DIR`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parent / "data"
SEED = 0

# Words the tiny text vocabularies know as whole tokens (anything else falls back to characters).
_WORDS = (
    "a an the of and in on with at to is are image picture photo please provide comprehensive description "
    "including color colors shapes shape any actions taking place briefly describe main subject background "
    "red green blue yellow white black gray orange purple brown small large big square circle disk stripe "
    "person man woman dog cat car tree house sky grass water table chair"
).split()
_CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"-/()&+")


def objects365_words() -> list[str]:
    """Lower-cased words of the Objects365 names (for the tiny Grounding DINO vocabulary)."""
    names = (DATA / "objects365.txt").read_text().splitlines()
    words: set[str] = set()
    for name in names:
        words.update(name.lower().replace("/", " ").split())
    return sorted(words)


# ---------------------------------------------------------------- tokenizers


def clip_tokenizer():
    """The real 49,408-token CLIP BPE tokenizer, built from the vocabulary file that ships inside open_clip."""
    import open_clip
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]  # CLIP's SimpleTokenizer recipe
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges)


def t5_tokenizer():
    """A tiny T5 (Unigram) tokenizer: characters plus a few whole words; pad=0, eos=1, unk=2 as in T5."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in _CHARS] + [("▁" + c, -6.0) for c in _CHARS]
    pieces += [("▁" + w, -1.0) for w in _WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def bert_tokenizer(words: list[str]):
    """A tiny uncased WordPiece (BERT) tokenizer: special tokens, characters, `##` characters, `words`."""
    from transformers import BertTokenizer

    chars = sorted({c.lower() for c in _CHARS})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    vocab += [w for w in dict.fromkeys(words) if w not in vocab]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


# ---------------------------------------------------------------- transformers presets


def _save(out: Path, model, processor) -> None:
    model.save_pretrained(out)
    processor.save_pretrained(out)



def make_instructblip(language_model: str = "t5"):
    """(model, processor): InstructBLIP, tiny sizes, with a Flan-T5 LM (as the real `instructblip-flan-t5-xl`)
    or, with `language_model="llama"`, a decoder-only LM (as `instructblip-vicuna-7b`)."""
    from transformers import (
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
        LlamaConfig,
        T5Config,
    )

    num_query_tokens = 4
    tokenizer = t5_tokenizer()
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,  # the processor adds the `<image>` token to it here
        qformer_tokenizer=bert_tokenizer(_WORDS),
        num_query_tokens=num_query_tokens,
    )
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    if language_model == "t5":
        text_config = T5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
            num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        )
    elif language_model == "llama":
        text_config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=1,
        )
    else:
        raise ValueError(f"language_model must be 't5' or 'llama', got {language_model!r}")
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8,
        ).to_dict(),
        qformer_config=InstructBlipQFormerConfig(
            vocab_size=len(processor.qformer_tokenizer), hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, encoder_hidden_size=32, max_position_embeddings=64,
        ).to_dict(),
        text_config=text_config.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_index,
    )
    torch.manual_seed(SEED)
    model = InstructBlipForConditionalGeneration(config).eval()
    if language_model == "t5":
        model.generation_config.decoder_start_token_id = 0
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    return model, processor


def build_instructblip(out: Path) -> None:
    _save(out, *make_instructblip())


def make_owlv2():
    """(model, processor): OWLv2 (CLIP text + ViT image towers, box/class heads) at 64², real CLIP tokenizer."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    config = Owlv2Config(
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
            patch_size=16,
        ),
        projection_dim=32,
    )
    torch.manual_seed(SEED)
    model = Owlv2ForObjectDetection(config).eval()
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=clip_tokenizer()
    )
    return model, processor


def build_owlv2(out: Path) -> None:
    _save(out, *make_owlv2())


def build_grounding_dino(out: Path) -> None:
    """Grounding DINO with a tiny Swin backbone and a tiny BERT text encoder (vocabulary: Objects365 words)."""
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    tokenizer = bert_tokenizer(_WORDS + objects365_words())
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, image_size=64,
            out_features=["stage2", "stage3", "stage4"],
        ).to_dict(),
        text_config=BertConfig(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=256,
        ).to_dict(),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=30, num_feature_levels=3,
        max_text_len=256,
    )
    torch.manual_seed(SEED)
    model = GroundingDinoForObjectDetection(config).eval()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}),
        tokenizer=tokenizer,
    )
    _save(out, model, processor)


def build_depth_saliency(out: Path) -> None:
    """Depth Anything (DINOv2 backbone + DPT head) at 56², loadable with `AutoModelForDepthEstimation`."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, DPTImageProcessor, Dinov2Config

    backbone = Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=56,
        patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
        out_indices=[1, 2, 3, 4], reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone.to_dict(), reassemble_hidden_size=32, patch_size=14,
        neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8,
        depth_estimation_type="relative",
    )
    torch.manual_seed(SEED)
    model = DepthAnythingForDepthEstimation(config).eval()
    processor = DPTImageProcessor(
        size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14, do_pad=False,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )
    _save(out, model, processor)


def tiny_sam_geometry():
    """A 64² SAM: ViT encoder of 2 blocks × 32 channels, 32-channel prompt encoder and mask decoder."""
    from pipelines.segment import SamGeometry

    return SamGeometry(
        img_size=64, patch_size=8, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
        encoder_global_attn_indexes=(1,), window_size=4, prompt_embed_dim=32, mask_in_chans=8,
        decoder_depth=2, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32,
    )


def build_sam(out: Path) -> None:
    """segment-anything's own classes at 64²: a state dict (`sam.pth`) plus `sam_config.json` for the geometry."""
    from pipelines.segment import SAM_CONFIG_NAME, build_sam_model

    geometry = tiny_sam_geometry()
    torch.manual_seed(SEED)
    model = build_sam_model(geometry)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "sam.pth")
    config = {"checkpoint": "sam.pth", **geometry.to_dict()}
    (out / SAM_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


BUILDERS: dict[str, Callable[[Path], None]] = {
    "instructblip": build_instructblip,
    "owlv2": build_owlv2,
    "grounding-dino": build_grounding_dino,
    "sam": build_sam,
    "depth-saliency": build_depth_saliency,
}


def build_tiny_models(root: Path, only: list[str] | None = None) -> dict[str, Path]:
    """Build the pipeline presets into `root/<name>/` (all, or the names in `only`); returns name → folder."""
    root = Path(root)
    names = list(BUILDERS) if only is None else list(only)
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise KeyError(f"unknown tiny preset(s) {unknown}; known: {', '.join(BUILDERS)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    built = {}
    for name in names:
        t0 = time.perf_counter()
        BUILDERS[name](root / name)
        built[name] = root / name
        log.info("built tiny %s in %.1fs", name, time.perf_counter() - t0)
    return built


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.tiny",
        description="Build the tiny random-weight presets of the MLCID construction models (offline, seconds).",
    )
    parser.add_argument("--out", type=Path, required=True, help="tiny-model root folder (LAYERDIFF_TINY_MODELS)")
    parser.add_argument("--only", nargs="*", choices=sorted(BUILDERS), help="build only these presets")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    built = build_tiny_models(args.out, args.only)
    for name, path in built.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
