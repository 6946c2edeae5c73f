"""Trainer: objective pieces, a tiny end-to-end run, exact resume, and the bad-input paths (NaN, checkpoints, SD)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from model.training import checkpoint as ckpt
from model.training.config import TrainConfig, load_config
from model.training.ema import EMA
from model.training.losses import drop_prompts, layered_noise_loss, sample_timesteps
from cli.main import layerdiff_main
from model.training.trainer import EXIT_BAD_INPUT, EXIT_DIVERGED, Trainer

from tests.builders import make_sample, write_raw_shard, write_shards

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread on shared cores

TINY = str(Path(__file__).resolve().parents[2] / "model" / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("mlcid"), shards=2, per_shard=6, size=40, fg_counts=(1, 2, 3))


def run(shards: str, out: Path, steps: int, *extra: str) -> int:
    return layerdiff_main(["train", "--data", shards, "--out", str(out), "--config", TINY, "--preset", "tiny",
                           "--max-steps", str(steps), *extra])


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- resume checks: how far a resumed run ends from the uninterrupted one, against a control ------------------


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The newest checkpoint's UNet weights and AdamW moments as named float tensors."""
    from safetensors.torch import load_file

    path = ckpt.latest_checkpoint(run_dir)
    out = {f"weight/{k}": v.float() for k, v in load_file(str(path / ckpt.UNET_DIR / ckpt.WEIGHTS)).items()}
    moments = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)["optimizer"]["state"]
    for i, state in moments.items():
        out.update({f"{name}/{i}": state[name].float() for name in ("exp_avg", "exp_avg_sq")})
    return out


def resume_deviation(full: Path, resumed: Path) -> dict[str, float]:
    """max |Δ| between two runs of the same length: per-step losses, final weights, final AdamW moments."""
    a, b = final_state(full), final_state(resumed)
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
    la, lb = losses(full), losses(resumed)
    assert len(la) == len(lb), (la, lb)
    dev = {"loss": max(abs(x - y) for x, y in zip(la, lb))}
    for group in ("weight", "exp_avg", "exp_avg_sq"):
        dev[group] = max((a[k] - b[k]).abs().max().item() for k in a if k.startswith(group + "/"))
    return dev


def forget_optimizer_state(run_dir: Path) -> None:
    """The control: the newest checkpoint keeps its weights, schedule, RNG and data position, but its AdamW state
    becomes a fresh optimizer's (no moments, step 0)."""
    path = ckpt.latest_checkpoint(run_dir) / "optimizer.pt"
    saved = torch.load(path, map_location="cpu", weights_only=True)
    saved["optimizer"]["state"] = {}
    torch.save(saved, path)


def assert_resume_beats_control(resumed: dict[str, float], control: dict[str, float], ratio: float = 0.1) -> None:
    """The resumed run must end `ratio` × closer to the uninterrupted one than a run that lost its optimizer state,
    on every measure (the control must deviate at all, or the check would prove nothing)."""
    for measure, lost in control.items():
        assert lost > 0, f"losing the optimizer state changed no {measure}: the comparison cannot see it ({control})"
        assert resumed[measure] <= ratio * lost, f"{measure}: resumed {resumed} vs lost-optimizer control {control}"


def resume_with_control(shards: str, root: Path, steps: int, every: int, *extra: str) -> tuple[dict, dict]:
    """Uninterrupted run, run stopped at `every` and resumed, and the same with the optimizer state thrown away;
    returns (resumed, control) deviations from the uninterrupted run."""
    opts = ("--set", f"checkpoint_every={every}", *extra)
    assert run(shards, root / "full", steps, *opts) == 0
    assert run(shards, root / "part", every, *opts) == 0
    shutil.copytree(root / "part", root / "lost")
    forget_optimizer_state(root / "lost")
    for name in ("part", "lost"):
        assert run(shards, root / name, steps, "--resume", *opts) == 0
    return resume_deviation(root / "full", root / "part"), resume_deviation(root / "full", root / "lost")


# -- objective pieces --------------------------------------------------------------------------------------------


def test_timesteps_shared_or_per_layer():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(4000, 3, 1000, 0.5, g)
    shared = (t == t[:, :1]).all(1).float().mean().item()
    assert t.shape == (4000, 3) and t.min() >= 0 and t.max() < 1000
    assert 0.45 < shared < 0.55  # per-layer draws almost never coincide
    always = sample_timesteps(50, 3, 1000, 1.0, g)
    assert (always == always[:, :1]).all()


def test_prompt_drops_are_independent_and_about_ten_percent():
    g = torch.Generator().manual_seed(0)
    glob, layers = drop_prompts(["g"] * 5000, [["the background", "a cat"]] * 5000, 0.1, 0.1, g)
    dg = [x == "" for x in glob]
    dl = [ls == ["", ""] for ls in layers]
    assert 0.08 < sum(dg) / 5000 < 0.12 and 0.08 < sum(dl) / 5000 < 0.12
    both = sum(a and b for a, b in zip(dg, dl)) / 5000
    assert both < 0.03  # independent: ~1%
    assert all(ls in (["", ""], ["the background", "a cat"]) for ls in layers)


def test_loss_ignores_padding_layers_and_weights_mask_channels():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 8, 4, 4), torch.randn(2, 3, 8, 4, 4)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    loss, parts = layered_noise_loss(pred, target, valid)
    pred2 = pred.clone()
    pred2[0, 2] += 100.0  # padding layer
    assert torch.equal(layered_noise_loss(pred2, target, valid)[0], loss)
    full = ((pred - target) ** 2).mean(dim=(2, 3, 4))
    assert torch.allclose(loss, full[valid].mean(), atol=1e-6)  # w=1: mean over all 8 channels (Eq. 5)
    img_only, _ = layered_noise_loss(pred, target, valid, mask_weight=0.0)
    assert torch.allclose(img_only, parts["image"])


def test_ema_moves_towards_weights_and_round_trips(tmp_path):
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, decay=0.5)
    before = ema.shadow["weight"].clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    assert torch.allclose(ema.shadow["weight"], before + 0.5)
    ema.save(tmp_path / "ema.safetensors")
    other = EMA(m, decay=0.5)
    other.load(tmp_path / "ema.safetensors")
    assert torch.equal(other.shadow["weight"], ema.shadow["weight"])


def test_config_recipe_and_errors(tmp_path):
    paper = load_config()
    assert (paper.lr, paper.weight_decay, paper.warmup_steps, paper.batch_size, paper.grad_accum) == (
        1e-5, 1e-2, 500, 32, 8)
    assert paper.data.resolution == 256 and paper.global_prompt_drop == paper.layer_prompt_drop == 0.1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"lr": 1e-4, "bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        load_config(bad)
    with pytest.raises(ValueError, match="too_many_layers"):
        load_config(TINY, ["data.too_many_layers=drop"])
    assert load_config(TINY, ["data.random_scale=[1, 2]"]).data.random_scale == (1.0, 2.0)
    assert load_config(TINY, ["lr=1e-3"]).lr == 1e-3  # YAML 1.1 reads 1e-3 as a string
    with pytest.raises(ValueError, match="expected a number"):
        load_config(TINY, ["lr=fast"])


# -- end to end ----------------------------------------------------------------------------------------------------


def index_resolution(run_dir) -> int:
    return json.loads((run_dir / "model_index.json").read_text())["training_resolution"]


def test_tiny_run_writes_metrics_checkpoints_and_a_pipeline_folder(tiny_models, shards, tmp_path):
    from model.network.unet import LayerDiffUNet

    out = tmp_path / "run"
    assert run(shards, out, 3, "--set", "use_ema=true", "--set", "record_keys=true") == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all(x["loss"] > 0 and x["samples_per_s"] > 0 and x["lr"] > 0 for x in lines)
    assert lines[0]["lr"] < lines[-1]["lr"] == pytest.approx(1e-4)  # linear warm-up (2 steps) then constant
    cp = out / "checkpoint-000003"
    for member in ckpt.REQUIRED + ("ema.safetensors",):
        assert (cp / member).is_file(), member
    assert not list(out.glob("*.tmp"))
    unet = LayerDiffUNet.from_pretrained(cp / "unet")
    assert unet.config.max_layers == 4
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["model.network.unet", "LayerDiffUNet"]
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / sub).is_dir() and sub in index
    final = LayerDiffUNet.from_pretrained(out / "unet")  # EMA weights differ from the last step's
    assert any(not torch.equal(a, b) for a, b in zip(final.state_dict().values(), unet.state_dict().values()))
    from model.sampling.pipeline import LayerDiffPipeline  # the sampler loads the run folder as a pipeline

    pipe = LayerDiffPipeline.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), final.state_dict().values()))
    # the final save also wrote the model card (model.hub): steps, resolution, last loss; sampling defaults to it
    card = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert card["training_steps"] == 3 and card["metrics"]["final_train_loss"] == pytest.approx(lines[-1]["loss"])
    assert card["training_resolution"] == pipe.default_size == index_resolution(out)
    keys = (out / "keys-rank0.txt").read_text().split()
    assert len(keys) == 2 * 3 * 2  # (step, key) × batch 2 × 3 steps
    assert list(out.glob("tb/events.out.tfevents.*"))


def test_resume_continues_exactly(tiny_models, shards, tmp_path):
    loader = ["--set", "data.num_workers=2", "--set", "checkpoint_every=3", "--set", "record_keys=true"]
    assert run(shards, tmp_path / "full", 6, *loader) == 0
    assert run(shards, tmp_path / "part", 3, *loader) == 0
    assert (tmp_path / "part" / "checkpoint-000003" / ckpt.COMPLETE).is_file()
    # a local folder is complete once renamed from .tmp: checkpoints from before complete.json still resume
    (tmp_path / "part" / "checkpoint-000003" / ckpt.COMPLETE).unlink()
    assert run(shards, tmp_path / "part", 6, "--resume", *loader) == 0
    full, part = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert len(full) == len(part) == 6
    deviation = resume_deviation(tmp_path / "full", tmp_path / "part")  # losses, weights and AdamW moments
    assert max(deviation.values()) <= 1e-6, deviation
    keys = [(tmp_path / run_dir / "keys-rank0.txt").read_text() for run_dir in ("full", "part")]
    assert keys[0] == keys[1] and len(keys[0].splitlines()) == 12  # same samples, same order
    # a run folder with checkpoints is never silently restarted
    assert run(shards, tmp_path / "part", 6, *loader) == EXIT_BAD_INPUT


def test_resume_check_sees_a_lost_optimizer_state(tiny_models, shards, tmp_path):
    """The GPU resume test's comparison on CPU: a resume that drops AdamW's moments is caught on every measure."""
    resumed, control = resume_with_control(shards, tmp_path, 4, 2)
    assert_resume_beats_control(resumed, control)
    with pytest.raises(AssertionError, match="lost-optimizer control"):  # the control judged as a resume fails
        assert_resume_beats_control(control, control)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tiny_models, shards, tmp_path, monkeypatch, caplog):
    real = Trainer.compute_loss
    calls = {"n": 0}

    def flaky(self, batch):
        calls["n"] += 1
        loss, parts = real(self, batch)
        return (loss * float("nan"), parts) if calls["n"] == 3 else (loss, parts)

    monkeypatch.setattr(Trainer, "compute_loss", flaky)
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR):
        assert run(shards, out, 5, "--set", "checkpoint_every=1") == EXIT_DIVERGED
    assert "diverged at step 3" in caplog.text and "checkpoint-000002" in caplog.text
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-000001", "checkpoint-000002"]
    assert not (out / "model_index.json").exists()


def test_corrupt_or_mismatched_checkpoint_is_refused(tiny_models, shards, tmp_path, caplog):
    out = tmp_path / "run"
    assert run(shards, out, 3) == 0
    weights = out / "checkpoint-000003" / "unet" / ckpt.WEIGHTS
    good = weights.read_bytes()
    with caplog.at_level(logging.ERROR):
        # another model layout (max_layers 3) than the checkpoint's
        assert run(shards, out, 4, "--resume", "--set", "data.max_layers=3") == EXIT_BAD_INPUT
        assert "different model" in caplog.text and "max_layers" in caplog.text
        caplog.clear()
        weights.write_bytes(good[: len(good) // 2])
        assert run(shards, out, 4, "--resume") == EXIT_BAD_INPUT
        assert "corrupt" in caplog.text
        caplog.clear()
        weights.unlink()
        assert run(shards, out, 4, "--resume") == EXIT_BAD_INPUT
        assert "incomplete" in caplog.text
    weights.write_bytes(good)
    assert run(shards, out, 4, "--resume") == 0 and len(losses(out)) == 4


def test_a_run_resumes_after_its_pretrained_folder_moved(tiny_models, shards, tmp_path):
    """Where the SD weights were loaded from (the config's nested `_name_or_path`) is not part of the model: a
    run whose `--pretrained` folder was copied elsewhere resumes, and a layout change is still refused."""
    first, moved = tmp_path / "sd-a", tmp_path / "sd-b"
    shutil.copytree(tiny_models / "sd15", first)
    out = tmp_path / "run"
    train = ["train", "--data", shards, "--out", str(out), "--config", TINY]
    assert layerdiff_main([*train, "--pretrained", str(first), "--max-steps", "2"]) == 0
    first.rename(moved)
    assert layerdiff_main([*train, "--pretrained", str(moved), "--max-steps", "3", "--resume"]) == 0
    assert len(losses(out)) == 3
    assert layerdiff_main([*train, "--pretrained", str(moved), "--max-steps", "4", "--resume",
                           "--set", "data.max_layers=3"]) == EXIT_BAD_INPUT


def test_bad_samples_and_a_corrupt_shard_mid_stream_are_counted_and_training_goes_on(tiny_models, tmp_path):
    data = tmp_path / "mlcid"
    data.mkdir()
    write_raw_shard(data / "mlcid-000000.tar", [make_sample("a0", 40, 1), make_sample("big", 40, 4), make_sample("a1", 40, 2)])
    write_raw_shard(data / "mlcid-000001.tar", [make_sample(f"b{i}", 40, 1, seed=i) for i in range(3)], 0.7)
    write_raw_shard(data / "mlcid-000002.tar", [make_sample(f"c{i}", 40, 2, seed=i) for i in range(3)])
    out = tmp_path / "run"
    rc = run(str(data), out, 3, "--set", "data.resample=false", "--set", "data.shuffle_shards=false",
             "--set", "data.shuffle_buffer=0")
    assert rc == 0
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["dropped"] == {"too_many_layers": 1, "truncated_shard": 1}


def test_pretrained_folder_that_is_not_sd_is_refused(tiny_models, shards, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        rc = layerdiff_main(["train", "--data", shards, "--out", str(tmp_path / "run"), "--config", TINY,
                             "--pretrained", str(tiny_models / "sd15" / "vae")])
    assert rc == EXIT_BAD_INPUT
    assert "not an SD-1.x pipeline folder" in caplog.text


def test_trainer_rejects_batch_not_divisible_by_workers(monkeypatch):
    monkeypatch.setattr("model.training.trainer._dist", lambda: (0, 2))  # as if running in 2 DDP workers
    with pytest.raises(ValueError, match="not divisible by 2 workers"):
        Trainer(TrainConfig(batch_size=3), "unused", "unused")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_autocast_run_and_resume(tiny_models, shards, tmp_path):
    """bf16/fp16 autocast on CUDA: finite losses, checkpoints and a resume. GPU kernels need not be bit-exact, so
    the resume is judged against a control that lost its optimizer state: it must end ≥ 10× closer to the
    uninterrupted run in losses, weights and AdamW moments."""
    resumed, control = resume_with_control(shards, tmp_path, 4, 2)
    assert all(torch.isfinite(torch.tensor(losses(tmp_path / name))).all() for name in ("full", "part"))
    assert_resume_beats_control(resumed, control)


def test_gradient_checkpointing_setting_is_checked():
    from model.training.config import TrainConfig

    for ok in (False, True, "full", "layer_blocks"):
        TrainConfig(gradient_checkpointing=ok).validate()
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        TrainConfig(gradient_checkpointing="sometimes").validate()
