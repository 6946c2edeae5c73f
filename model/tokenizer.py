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


def write_clip_vocab_files(folder: str | Path) -> None:
    """Write `vocab.json` and `merges.txt` (the slow-tokenizer format every transformers version reads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")


def build_clip_tokenizer(max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """The real CLIP tokenizer as a transformers `CLIPTokenizer` (pad = end-of-text, like SD 1.5)."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=max_length,
    )
