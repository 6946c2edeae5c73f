"""The real CLIP BPE tokenizer (49,408 tokens), built offline from the vocabulary file open_clip ships.

OpenAI's CLIP (and so SD 1.x) tokenizes with one byte-level BPE table. open_clip carries it as
`bpe_simple_vocab_16e6.txt.gz`; turned into Hugging Face's `vocab.json` + `merges.txt` it gives exactly the
tokenizer of `openai/clip-vit-large-patch14` ("a photo of a cat" -> 49406, 320, 1125, 539, 320, 2368, 49407),
so the tiny presets tokenize like the real models without any download.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# open_clip's file holds a header line, then merges; CLIP keeps the first 49152 - 256 - 2 of them.
_N_MERGES = 49152 - 256 - 2


def clip_bpe_path() -> Path:
    """Path of the BPE file inside the installed open_clip package."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip's CLIP BPE file is missing: {path} (reinstall open-clip-torch)")
    return path


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The CLIP vocabulary (token -> id, 49,408 entries) and its BPE merges, in CLIP's own order."""
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 1 + _N_MERGES])
    if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"unexpected CLIP BPE file {clip_bpe_path()}: want {_N_MERGES} merge pairs")
    byte_tokens = list(bytes_to_unicode().values())  # 256 byte symbols
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges] + [BOS, EOS]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise ValueError(f"built {len(tokens)} CLIP tokens, want {CLIP_VOCAB_SIZE}")
    return {tok: i for i, tok in enumerate(tokens)}, merges  # type: ignore[return-value]


def _bpe_merges_of(token: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges CLIP's BPE applies, in order, to build one of its output tokens from its byte symbols."""
    symbols = list(token[:-4]) if token.endswith("</w>") else list(token)
    if token.endswith("</w>"):
        symbols[-1] += "</w>"
    used = []
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == len(ranks):
            raise ValueError(f"{token!r} is not a CLIP BPE token")
        used.append((symbols[i], symbols[i + 1]))
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return used


def pruned_clip_vocab_and_merges(texts: list[str]) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's vocabulary cut down to what `texts` need: the 512 byte symbols, the merges CLIP's BPE applies
    to these texts (in CLIP's order) and the two special tokens.

    BPE merges the lowest-ranked adjacent pair first; every merge used on these texts is kept with its relative
    rank, so they tokenize into exactly the pieces the full tokenizer gives (only the ids differ). Other words
    still tokenize, into smaller pieces. A text encoder over this vocabulary needs ~1 % of CLIP's embedding table.
    """
    vocab, merges = clip_vocab_and_merges()
    ranks = {pair: i for i, pair in enumerate(merges)}
    full = build_clip_tokenizer()
    needed: set[tuple[str, str]] = set()
    for token in {t for text in texts for t in full.tokenize(text)}:
        needed.update(_bpe_merges_of(token, ranks))
    kept = tuple(m for m in merges if m in needed)
    byte_tokens = list(vocab)[:512]
    tokens = byte_tokens + ["".join(m) for m in kept] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, kept


def write_clip_vocab_files(folder: str | Path, texts: list[str] | None = None) -> None:
    """Write `vocab.json` and `merges.txt` (the slow-tokenizer format every transformers version reads):
    CLIP's full tables, or with `texts` the ones pruned to them (`pruned_clip_vocab_and_merges`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges() if texts is None else pruned_clip_vocab_and_merges(texts)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")


def build_clip_tokenizer(max_length: int = CLIP_MAX_LENGTH, texts: list[str] | None = None) -> CLIPTokenizer:
    """The real CLIP tokenizer as a transformers `CLIPTokenizer` (pad = end-of-text, like SD 1.5); with
    `texts`, its vocabulary pruned to them (`pruned_clip_vocab_and_merges`)."""
    vocab, merges = clip_vocab_and_merges() if texts is None else pruned_clip_vocab_and_merges(texts)
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=max_length,
    )
