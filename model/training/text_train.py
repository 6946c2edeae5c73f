"""Train a small CLIP text encoder to read captions before LayerDiff trains with it frozen (learn-bench).

No pretrained CLIP reaches these machines. A *random* frozen text encoder gives every prompt a distinct embedding,
but what a caption says about one thing (the background's colour) sits in the token of a colour word whose role
(object or background) only its neighbours tell; the UNet's cross-attention has to untangle that alone. SD's text
encoder arrives pretrained, so here one is trained first, on the captions themselves: each prompt comes with its
facts (strings such as "background:cyan", "object:red circle"), and a linear multi-label head on the mean of the
encoder's last hidden state (what the UNet's cross-attention reads, all 77 positions) learns to recover them
(binary cross-entropy). The head is thrown away; the encoder is saved with `save_pretrained` (safetensors) and
stays frozen afterwards, as in the paper's recipe.

`linear_probe_accuracy` measures the same readability without training the encoder: a logistic regression on
the frozen mean embedding, fit on some prompts and scored on others (used to compare random vs trained).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass
class TextTrainConfig:
    """Schedule of the caption pre-training (the encoder's own sizes come with the model)."""

    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    seed: int = 0
    threads: int = 0  # torch threads (0 = leave as is)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"steps and batch_size must be ≥ 1 and lr > 0, got {self.steps}, "
                             f"{self.batch_size}, {self.lr}")


@dataclass
class TextTrainReport:
    """How well the facts are read from the mean embedding: training-head accuracy and the loss curve."""

    steps: int
    facts: int  # size of the fact vocabulary
    fact_accuracy: float  # per-fact binary accuracy of the head on the training prompts at the end
    train_seconds: float
    params_m: float
    losses: list[float] = field(default_factory=list)


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids (N, 77), padded like `model.loading.encode_prompts` (pad = end-of-text, no attention mask)."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def mean_embedding(text_encoder: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean over all positions of the last hidden state: (N, 77) ids → (N, D)."""
    return text_encoder(input_ids)[0].mean(dim=1)


def fact_matrix(facts: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """Sorted fact vocabulary and the (N, F) 0/1 target matrix."""
    vocab = sorted({f for fs in facts for f in fs})
    if not vocab:
        raise ValueError("no facts given: nothing to train the text encoder on")
    index = {f: i for i, f in enumerate(vocab)}
    targets = torch.zeros(len(facts), len(vocab))
    for n, fs in enumerate(facts):
        targets[n, [index[f] for f in fs]] = 1.0
    return vocab, targets


def train_text_encoder(text_encoder: Any, tokenizer: Any, prompts: Sequence[str], facts: Sequence[Sequence[str]],
                       config: TextTrainConfig) -> TextTrainReport:
    """Train `text_encoder` in place so its mean embedding tells each prompt's facts; returns a report.

    prompts (N,) with facts (N,) lists of strings (an empty list: a prompt that states nothing, e.g. "").
    The encoder is left in eval mode with gradients off (frozen, as LayerDiff uses it).
    """
    if len(prompts) != len(facts) or not prompts:
        raise ValueError(f"need as many fact lists as prompts (≥ 1), got {len(prompts)} prompts, {len(facts)} lists")
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    vocab, targets = fact_matrix(facts)
    ids = tokenize(tokenizer, prompts)  # (N, 77)
    dim = text_encoder.config.hidden_size
    head = torch.nn.Linear(dim, len(vocab))
    params = [p for p in text_encoder.parameters()] + list(head.parameters())
    for p in text_encoder.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, config.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / config.steps))))
    gen = torch.Generator().manual_seed(config.seed)
    text_encoder.train()
    losses, start = [], time.perf_counter()
    for _ in range(config.steps):
        batch = torch.randint(len(prompts), (min(config.batch_size, len(prompts)),), generator=gen)  # (b,)
        logits = head(mean_embedding(text_encoder, ids[batch]))  # (b, F)
        loss = F.binary_cross_entropy_with_logits(logits, targets[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    text_encoder.eval()
    for p in text_encoder.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        pred = torch.cat([head(mean_embedding(text_encoder, ids[i:i + 256])) for i in range(0, len(ids), 256)]) > 0
    acc = float((pred == targets.bool()).float().mean())
    seconds = time.perf_counter() - start
    log.info("text encoder: %d steps in %.0f s, loss %.3f → %.3f, fact accuracy %.3f", config.steps, seconds,
             np.mean(losses[:10]), np.mean(losses[-10:]), acc)
    return TextTrainReport(steps=config.steps, facts=len(vocab), fact_accuracy=acc, train_seconds=round(seconds, 1),
                           params_m=sum(p.numel() for p in text_encoder.parameters()) / 1e6, losses=losses)


@torch.no_grad()
def linear_probe_accuracy(text_encoder: Any, tokenizer: Any, train_prompts: Sequence[str],
                          train_labels: Sequence[str], test_prompts: Sequence[str], test_labels: Sequence[str],
                          seed: int = 0) -> float:
    """Accuracy of a logistic regression on the frozen mean embedding, fit on train, scored on test prompts."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def embed(prompts: Sequence[str]) -> np.ndarray:
        ids = tokenize(tokenizer, prompts)
        return torch.cat([mean_embedding(text_encoder, ids[i:i + 256]) for i in range(0, len(ids), 256)]).numpy()

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    probe.fit(embed(train_prompts), list(train_labels))
    return float(np.mean(probe.predict(embed(test_prompts)) == np.asarray(test_labels)))
