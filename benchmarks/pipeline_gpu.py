"""`make bench-pipeline-gpu`: GPU seconds per sample of each model-backed MLCID stage, full-size, random weights.

No download: the architectures are built from the libraries' config classes with the real sizes — InstructBLIP
Flan-T5-XL (EVA ViT-g + Q-Former + T5-XL, 4.0B), OWLv2-B/16 at 960², SAM ViT-H at 1024², SD 1.5 inpainting
(UNet 860M, VAE, CLIP-L text encoder) at 512². Random weights decide nothing, so the work is pinned: generation
always makes a fixed number of tokens, every image has a fixed number of detections / objects. Each stage runs
through its real stage class with the model handed over by `use()`. The report gives s/sample per stage, their
sum, and H100-hours per 2M samples (one GPU runs all stages, as the Ray actors do). The sum counts every
stage for every sample; inputs dropped early (no detection, no valid mask) cost less, so the cost per *written*
sample is this figure divided by the stage-wise yield. Not timed: saliency (Depth-Anything-V2-Small, 25M
parameters), the mask rules and the cut-outs (CPU work).

`--tiny` runs the same code on CPU with tiny configs to check it works; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipelines.base import Detection, Item, ObjectLayer
from pipelines.tiny import (
    bert_tokenizer,
    clip_tokenizer,
    make_instructblip,
    make_owlv2,
    t5_tokenizer,
    tiny_sam_geometry,
)

log = logging.getLogger("bench_gpu")
STAGES = ("caption", "detect", "segment", "object_caption", "inpaint")


@dataclass
class BenchConfig:
    """What to measure. Defaults are the production profile's micro-batches at a 512² working size."""

    tiny: bool = False
    device: str = "auto"
    dtype: str = "auto"
    stages: tuple[str, ...] = STAGES
    samples: int = 64  # timed items per stage (after one warm-up micro-batch)
    image_size: int = 512
    batch_sizes: dict[str, int] = field(default_factory=lambda: {  # segment: what the memory sizing gives on
        "caption": 16, "detect": 16, "segment": 32, "object_caption": 32, "inpaint": 8})  # ≥ 22 GiB GPUs (cap)
    caption_tokens: int = 60  # generated tokens per global caption (fixed)
    object_tokens: int = 20  # generated tokens per object caption (fixed)
    detections_per_image: int = 8  # SAM boxes per image
    objects_per_image: int = 2  # foreground objects per image (object captions, inpaint hole)
    sd_steps: int = 20  # SDInpaintOptions' default (DPM-Solver++)
    sd_resolution: int = 512
    total_samples: int = 2_000_000

    @classmethod
    def tiny_profile(cls, **overrides) -> "BenchConfig":
        base = dict(tiny=True, device="cpu", dtype="float32", samples=4, image_size=64, caption_tokens=4,
                    object_tokens=3, detections_per_image=3, sd_steps=2, sd_resolution=64,
                    batch_sizes={k: 2 for k in STAGES})
        return cls(**{**base, **overrides})


# ---------------------------------------------------------------- models (random weights, real or tiny sizes)


def _build(device: torch.device, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Construct on `device` directly (fast random init on the GPU), fixed seed."""
    torch.manual_seed(0)
    with torch.device(device):
        return make().eval()


def instructblip(cfg: BenchConfig, device: torch.device):
    """InstructBLIP Flan-T5-XL (vision/Q-Former defaults = the real ones) + a processor with an offline tokenizer."""
    if cfg.tiny:
        return make_instructblip()
    from transformers import (
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        T5Config,
    )

    tokenizer = t5_tokenizer()  # ids < 32128; the real SentencePiece vocabulary is not needed to time compute
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessor(
            size={"height": 224, "width": 224}, image_mean=[0.48145466, 0.4578275, 0.40821073],
            image_std=[0.26862954, 0.26130258, 0.27577711],
        ),
        tokenizer=tokenizer, qformer_tokenizer=bert_tokenizer([]), num_query_tokens=32,
    )
    config = InstructBlipConfig(
        text_config=T5Config(  # google/flan-t5-xl
            vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
            eos_token_id=1,
        ).to_dict(),
        num_query_tokens=32,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = _build(device, lambda: InstructBlipForConditionalGeneration(config))
    model.generation_config.decoder_start_token_id, model.generation_config.eos_token_id = 0, 1
    return model, processor


def owlv2(cfg: BenchConfig, device: torch.device):
    """OWLv2-B/16 (`google/owlv2-base-patch16-ensemble` sizes: 960², patch 16) with the real CLIP tokenizer."""
    if cfg.tiny:
        return make_owlv2()
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    config = Owlv2Config(text_config={}, vision_config={"image_size": 960, "patch_size": 16})
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(), tokenizer=clip_tokenizer())
    return _build(device, lambda: Owlv2ForObjectDetection(config)), processor


def sam(cfg: BenchConfig, device: torch.device):
    """segment-anything ViT-H (or the tiny geometry)."""
    from pipelines.segment import SAM_ARCHS, build_sam_model

    geometry = tiny_sam_geometry() if cfg.tiny else SAM_ARCHS["vit_h"]
    return _build(device, lambda: build_sam_model(geometry))


def sd_inpaint(cfg: BenchConfig, device: torch.device):
    """`StableDiffusionInpaintPipeline` with SD 1.5 inpainting sizes (UNet in_channels 9), or tiny ones."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if cfg.tiny:
        unet_kw = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=16,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
        vae_kw = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=64,
                      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
        text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=77, projection_dim=32)
    else:  # stable-diffusion-v1-5/stable-diffusion-inpainting
        unet_kw = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                       sample_size=64, attention_head_dim=8,
                       down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                       up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae_kw = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
    unet = _build(device, lambda: UNet2DConditionModel(in_channels=9, out_channels=4, **unet_kw))
    vae = _build(device, lambda: AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **vae_kw))
    text_encoder = _build(device, lambda: CLIPTextModel(text))
    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = 77
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# ---------------------------------------------------------------- work items


def make_items(cfg: BenchConfig, n: int, seed: int = 0) -> list[Item]:
    """`n` random images with fixed detections (a grid of boxes) and fixed rectangular objects."""
    rng = np.random.default_rng(seed)
    s = cfg.image_size
    items = []
    for i in range(n):
        image = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
        boxes = []
        for k in range(cfg.detections_per_image):
            x0, y0 = (k % 4) * s // 4, (k // 4 % 4) * s // 4
            boxes.append(Detection((float(x0), float(y0), float(x0 + s // 3), float(y0 + s // 3)), 0.5, "Person"))
        objects = []
        for k in range(cfg.objects_per_image):
            mask = np.zeros((s, s), bool)
            x0 = k * s // max(1, cfg.objects_per_image)
            mask[s // 4 : 3 * s // 4, x0 : x0 + s // (2 * max(1, cfg.objects_per_image))] = True
            objects.append(ObjectLayer(mask, (x0, s // 4, x0 + s // 4, 3 * s // 4), 0.5, "Person", prompt="a person"))
        items.append(Item(key=f"bench-{i:06d}", image=image, global_prompt="a photo", detections=boxes,
                          objects=objects))
    return items


# ---------------------------------------------------------------- stages


def build_stage(kind: str, cfg: BenchConfig, device: torch.device, dtype: str):
    """The real stage class for `kind` with its full-size (or tiny) random-weight model handed over."""
    from pipelines.caption import CaptionOptions, GlobalCaption, ObjectCaption, ObjectCaptionOptions
    from pipelines.detect import DetectOptions, Owlv2Detector
    from pipelines.devices import ModelStageConfig
    from pipelines.inpaint import SDInpaintOptions, StableDiffusionInpainter
    from pipelines.segment import SamSegmenter

    common = ModelStageConfig(model="<random weights>", device=str(device), dtype=dtype,
                              batch_size=cfg.batch_sizes[kind])
    if kind in ("caption", "object_caption"):
        if kind == "caption":
            stage = GlobalCaption(common, CaptionOptions(max_new_tokens=cfg.caption_tokens))
        else:
            stage = ObjectCaption(common, ObjectCaptionOptions(max_new_tokens=cfg.object_tokens))
        model, processor = instructblip(cfg, device)
        model.generation_config.min_new_tokens = stage.options.max_new_tokens  # a fixed amount of decoding work
        stage.captioner.use(model, processor)
    elif kind == "detect":
        stage = Owlv2Detector(common, DetectOptions(score_threshold=0.0, max_detections=20))
        stage.use(*owlv2(cfg, device))
    elif kind == "segment":
        stage = SamSegmenter(common)
        stage.use(sam(cfg, device))
    elif kind == "inpaint":
        stage = StableDiffusionInpainter(common, SDInpaintOptions(num_inference_steps=cfg.sd_steps,
                                                                  resolution=cfg.sd_resolution))
        stage.use(sd_inpaint(cfg, device))
    else:
        raise KeyError(f"unknown stage {kind!r}; choose from {', '.join(STAGES)}")
    return stage


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_stage(kind: str, cfg: BenchConfig, device: torch.device, dtype: str) -> dict:
    """Build, warm up on one micro-batch, then time `cfg.samples` items: seconds/sample and peak memory."""
    t0 = time.perf_counter()
    stage = build_stage(kind, cfg, device, dtype)
    build_s = time.perf_counter() - t0
    stage(make_items(cfg, cfg.batch_sizes[kind], seed=1))  # warm-up: kernels, allocator, caches
    items = make_items(cfg, cfg.samples, seed=2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    stage(items)
    _sync(device)
    seconds = time.perf_counter() - t0
    result = {
        "stage": kind, "samples": len(items), "seconds": round(seconds, 3),
        "s_per_sample": seconds / len(items), "build_s": round(build_s, 1), "batch_size": cfg.batch_sizes[kind],
        "dropped": sum(not it.alive for it in items),
    }
    if device.type == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del stage
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run(cfg: BenchConfig) -> dict:
    """Time every requested stage; returns the report (per stage, total s/sample, GPU-hours per total_samples)."""
    from pipelines.devices import device_and_dtype

    device, dtype = device_and_dtype(cfg.device, cfg.dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    rows = []
    for kind in cfg.stages:
        log.info("timing %s ...", kind)
        rows.append(time_stage(kind, cfg, device, dtype_name))
        log.info("%s: %.4f s/sample", kind, rows[-1]["s_per_sample"])
    total = sum(r["s_per_sample"] for r in rows)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": dtype_name, "tiny": cfg.tiny, "config": dataclasses.asdict(cfg), "stages": rows,
        "s_per_sample_total": total,
        "gpu_hours_per_total_samples": total * cfg.total_samples / 3600.0,
    }


def format_report(report: dict) -> str:
    lines = [f"device: {report['device']}  dtype: {report['dtype']}  tiny: {report['tiny']}",
             f"{'stage':<16}{'batch':>6}{'s/sample':>12}{'peak GiB':>10}{'build s':>9}"]
    for r in report["stages"]:
        lines.append(f"{r['stage']:<16}{r['batch_size']:>6}{r['s_per_sample']:>12.4f}"
                     f"{r.get('peak_gib', float('nan')):>10.2f}{r['build_s']:>9.1f}")
    n = report["config"]["total_samples"]
    lines.append(f"{'total':<16}{'':>6}{report['s_per_sample_total']:>12.4f}")
    lines.append(f"GPU-hours for {n:,} samples (every stage on every sample) on {report['device']}: "
                 f"{report['gpu_hours_per_total_samples']:,.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pipeline_gpu",
        description="Seconds per sample of each model-backed MLCID stage at full size with random weights "
                    "(no download), and GPU-hours per 2M samples. --tiny: a quick CPU correctness run.",
    )
    parser.add_argument("--tiny", action="store_true",
                        help="tiny models on CPU (checks the code; the numbers mean nothing)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to time")
    parser.add_argument("--samples", type=int, help="timed items per stage (default 64; tiny 4)")
    parser.add_argument("--device", default=None, help="auto | cuda | cpu (default auto; tiny cpu)")
    parser.add_argument("--dtype", default=None, help="auto | float16 | bfloat16 | float32")
    parser.add_argument("--caption-tokens", type=int, help="generated tokens per global caption (default 60)")
    parser.add_argument("--object-tokens", type=int, help="generated tokens per object caption (default 20)")
    parser.add_argument("--sd-steps", type=int, help="SD inpainting denoising steps (default 20, DPM-Solver++)")
    parser.add_argument("--batch-size", action="append", default=[], metavar="STAGE=N",
                        help="micro-batch size of a stage (repeatable), e.g. inpaint=1")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    overrides = {k: v for k, v in {
        "stages": tuple(args.stages), "samples": args.samples, "device": args.device, "dtype": args.dtype,
        "caption_tokens": args.caption_tokens, "object_tokens": args.object_tokens, "sd_steps": args.sd_steps,
    }.items() if v is not None}
    cfg = BenchConfig.tiny_profile(**overrides) if args.tiny else BenchConfig(**overrides)
    for item in args.batch_size:
        stage, _, n = item.partition("=")
        if stage not in STAGES or not n.isdigit() or int(n) < 1:
            parser.error(f"--batch-size wants STAGE=N with STAGE in {', '.join(STAGES)} and N ≥ 1, got {item!r}")
        cfg.batch_sizes[stage] = int(n)
    report = run(cfg)
    print(format_report(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {args.out}")


if __name__ == "__main__":
    main()
