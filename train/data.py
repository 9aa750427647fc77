"""Corpus -> byte-level BPE tokenizer -> memory-mapped token file -> rank-sharded batches.

The embedded default corpus is the Python standard library's own source, present on every
machine; `data.path` points at a user's file or folder of text files instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

EOS = "<|endoftext|>"
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".c", ".h", ".html", ".csv"}


@dataclass
class DataConfig:
    """path: a text file or a folder of text files (None: the Python standard library).
    max_bytes: read at most this much of the corpus. cache_dir: tokenizer and token files."""

    path: str | None = None
    tokenizer: str | None = None  # a tokenizer.json (or a folder holding one) to use as is
    vocab_size: int = 2048
    seq_len: int = 128
    batch_size: int = 8  # sequences per rank per step
    max_bytes: int = 8_000_000
    cache_dir: str = ".cache/data"
    seed: int = 0


def corpus_files(cfg: DataConfig) -> list[Path]:
    """Sorted text files of the corpus, up to max_bytes in total."""
    if cfg.path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.glob("*.py") if p.is_file())
    else:
        root = Path(cfg.path).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"data.path {cfg.path!r} does not exist")
        if root.is_file():
            files = [root]
        else:
            files = sorted(p for p in root.rglob("*") if p.is_file()
                           and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(
                f"data.path {cfg.path!r} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
    chosen, total = [], 0
    for p in files:
        size = p.stat().st_size
        if total and total + size > cfg.max_bytes:
            break
        chosen.append(p)
        total += size
    return chosen


def _fingerprint(files: list[Path], cfg: DataConfig) -> str:
    h = hashlib.sha256(f"{cfg.vocab_size}:{cfg.tokenizer}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def _read(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="replace")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def prepare(cfg: DataConfig, log=print) -> Path:
    """Train the tokenizer and tokenize the corpus once; returns the cache folder holding
    tokenizer.json, tokens.bin (uint16/uint32) and meta.json. Safe to call from every rank:
    files appear atomically, and a finished folder is reused."""
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    files = corpus_files(cfg)
    out = Path(cfg.cache_dir).expanduser() / _fingerprint(files, cfg)
    meta_path = out / "meta.json"
    if meta_path.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    if cfg.tokenizer:
        src = Path(cfg.tokenizer).expanduser()
        src = src / "tokenizer.json" if src.is_dir() else src
        if not src.exists():
            raise FileNotFoundError(f"data.tokenizer {cfg.tokenizer!r} has no tokenizer.json")
        tok = Tokenizer.from_file(str(src))
        log(f"data: using the tokenizer {src} ({tok.get_vocab_size()} tokens)")
    else:
        log(f"data: training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) on "
            f"{len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:.1f} MB")
        tok = ByteLevelBPETokenizer()
        tok.train_from_iterator((_read(p) for p in files), vocab_size=cfg.vocab_size,
                                min_frequency=2, special_tokens=[EOS], show_progress=False)
        tok = tok._tokenizer
    _atomic_write(out / "tokenizer.json", tok.to_str().encode())
    eos = tok.token_to_id(EOS)
    dtype = np.uint16 if tok.get_vocab_size() < 2**16 else np.uint32
    ids: list[np.ndarray] = []
    for i in range(0, len(files), 64):
        for enc in tok.encode_batch([_read(p) for p in files[i:i + 64]]):
            ids.append(np.asarray(enc.ids + ([eos] if eos is not None else []), dtype=dtype))
    tokens = np.concatenate(ids)
    _atomic_write(out / "tokens.bin", tokens.tobytes())
    meta = dict(num_tokens=int(tokens.size), dtype=np.dtype(dtype).name,
                vocab_size=tok.get_vocab_size(), eos_id=eos, files=len(files))
    _atomic_write(meta_path, json.dumps(meta).encode())
    log(f"data: {tokens.size:,} tokens written to {out}")
    return out


class TokenBatches:
    """Deterministic, resumable batches: step s reads the global batch s (world * batch_size
    windows of seq_len + 1 tokens, from a seeded shuffle of non-overlapping windows, reshuffled
    each epoch); rank r takes its batch_size rows. The global batch does not depend on how
    many ranks share it, so a run resumes on another number of ranks."""

    def __init__(self, folder: Path, cfg: DataConfig, rank: int = 0, world: int = 1):
        meta = json.loads((folder / "meta.json").read_text())
        self.tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r")
        self.vocab_size = meta["vocab_size"]
        self.seq_len, self.batch_size = cfg.seq_len, cfg.batch_size
        self.rank, self.world, self.seed = rank, world, cfg.seed
        self.windows = (self.tokens.size - 1) // self.seq_len
        self.global_batch = self.batch_size * world
        if self.windows < self.global_batch:
            raise ValueError(f"corpus has {self.windows} windows of {self.seq_len} tokens, fewer "
                             f"than one global batch ({self.global_batch}); use more data or a "
                             "smaller data.seq_len / data.batch_size")
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.windows), epoch
        return self._perm

    def batch(self, step: int) -> torch.Tensor:
        """[batch_size, seq_len + 1] int64 token ids of this rank for global step `step`."""
        per_epoch = self.windows // self.global_batch
        epoch, i = divmod(step, per_epoch)
        order = self._order(epoch)
        start = i * self.global_batch + self.rank * self.batch_size
        rows = [self.tokens[w * self.seq_len:w * self.seq_len + self.seq_len + 1]
                for w in order[start:start + self.batch_size]]
        return torch.from_numpy(np.stack(rows).astype(np.int64))
