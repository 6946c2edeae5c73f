"""model.training.text_train: caption pre-training makes the background colour readable from the mean embedding
of a small CLIP text encoder, and leaves it frozen."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from mlcid.synthetic import SceneConfig, make_scene
from model.tokenizer import build_clip_tokenizer
from model.training.text_train import TextTrainConfig, fact_matrix, linear_probe_accuracy, train_text_encoder

CFG = SceneConfig(size=32, min_foregrounds=1, max_foregrounds=2, colours=("red", "green", "blue", "yellow"),
                  shapes=("circle", "square", "triangle"), background_colours=("purple", "orange", "cyan", "pink"),
                  background_patterns=("plain",), min_radius=0.2, max_radius=0.32)


pytestmark = pytest.mark.usefixtures("one_thread")  # a tiny encoder: one torch thread on shared cores


@pytest.fixture(scope="module")
def captions():
    scenes = [make_scene(CFG, 0, i) for i in range(260)]
    prompts = [s.global_prompt for s in scenes]
    bg = [s.source["background"]["colour"] for s in scenes]
    # background colour = the only fact: what the test asks the encoder to make readable
    return prompts, bg, [[f"background:{c}"] for c in bg]


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()  # CLIP's full tokenizer, as the tiny SD preset has it


def _tiny_encoder(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77))
    return encoder.eval(), tokenizer


def test_fact_matrix():
    vocab, targets = fact_matrix([["b", "a"], [], ["a"]])
    assert vocab == ["a", "b"] and targets.tolist() == [[1, 1], [0, 0], [1, 0]]
    with pytest.raises(ValueError, match="no facts"):
        fact_matrix([[], []])


def test_caption_training_makes_the_background_colour_readable_and_freezes(captions, tokenizer):
    prompts, bg, facts = captions
    encoder, tokenizer = _tiny_encoder(tokenizer)
    probe = lambda: linear_probe_accuracy(encoder, tokenizer, prompts[:200], bg[:200], prompts[200:], bg[200:])  # noqa: E731
    before = probe()
    report = train_text_encoder(encoder, tokenizer, prompts[:200], facts[:200],
                                TextTrainConfig(steps=80, batch_size=32, lr=3e-3))
    after = probe()
    assert report.facts == 4 and report.losses[-1] < 0.5 * report.losses[0]
    assert report.fact_accuracy > 0.9
    assert after >= 0.9 and after > before  # readable on captions it never saw
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_bad_inputs_are_refused(tokenizer):
    encoder, tokenizer = _tiny_encoder(tokenizer)
    with pytest.raises(ValueError, match="as many fact lists"):
        train_text_encoder(encoder, tokenizer, ["a"], [], TextTrainConfig(steps=1))
    with pytest.raises(ValueError, match="steps"):
        TextTrainConfig(steps=0)
