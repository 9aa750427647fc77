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
    max_bytes: read at most this much of the corpus. cache_dir: tokenizer and token files.
    val_fraction: share of the corpus's windows held out from training for the validation
    loss (trainer.eval_every), picked by a seeded shuffle: the same windows every run.
    text_field: a .jsonl file holds one document a line, the text under this key (as
    pretraining corpora ship); None reads .jsonl files as plain text."""

    path: str | None = None
    tokenizer: str | None = None  # a tokenizer.json (or a folder holding one) to use as is
    vocab_size: int = 2048
    seq_len: int = 128
    batch_size: int = 8  # sequences per rank per step
    max_bytes: int = 8_000_000
    cache_dir: str = ".cache/data"
    seed: int = 0
    val_fraction: float = 0.0
    text_field: str | None = "text"


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
    h = hashlib.sha256(f"{cfg.vocab_size}:{cfg.tokenizer}:{cfg.text_field}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def _read(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="replace")


def documents(p: Path, text_field: str | None) -> list[str]:
    """A corpus file's documents: a .jsonl file's records' text_field, one a line (blank
    lines skipped), or the whole file as one."""
    if p.suffix.lower() != ".jsonl" or text_field is None:
        return [_read(p)]
    docs = []
    for n, line in enumerate(_read(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not a JSON line ({e.msg}); set data.text_field=null "
                             "to read .jsonl files as plain text") from None
        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
            raise ValueError(f"{p}:{n}: no string field {text_field!r} (data.text_field); "
                             "set it to the key that holds the text, or to null to read "
                             ".jsonl files as plain text")
        docs.append(rec[text_field])
    return docs


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
        tok.train_from_iterator((doc for p in files for doc in documents(p, cfg.text_field)),
                                vocab_size=cfg.vocab_size,
                                min_frequency=2, special_tokens=[EOS], show_progress=False)
        tok = tok._tokenizer
    _atomic_write(out / "tokenizer.json", tok.to_str().encode())
    eos = tok.token_to_id(EOS)
    dtype = np.uint16 if tok.get_vocab_size() < 2**16 else np.uint32
    ids: list[np.ndarray] = []
    for i in range(0, len(files), 64):
        docs = [doc for p in files[i:i + 64] for doc in documents(p, cfg.text_field)]
        for enc in tok.encode_batch(docs):
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
    many ranks share it, so a run resumes on another number of ranks. With cfg.val_fraction,
    that share of the windows (a seeded choice) is never trained on: val_batch reads them."""

    def __init__(self, folder: Path, cfg: DataConfig, rank: int = 0, world: int = 1):
        meta = json.loads((folder / "meta.json").read_text())
        self.tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r")
        self.vocab_size = meta["vocab_size"]
        self.seq_len, self.batch_size = cfg.seq_len, cfg.batch_size
        self.rank, self.world, self.seed = rank, world, cfg.seed
        self.global_batch = self.batch_size * world
        windows = (self.tokens.size - 1) // self.seq_len
        if not 0 <= cfg.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
        n_val = int(round(windows * cfg.val_fraction))
        if cfg.val_fraction and n_val < self.global_batch:
            raise ValueError(f"data.val_fraction={cfg.val_fraction} holds out {n_val} windows, "
                             f"fewer than one global batch ({self.global_batch}): raise it")
        if n_val:
            held = np.random.default_rng([self.seed, 1 << 30]).permutation(windows)
            self.val_windows, self.train_windows = np.sort(held[:n_val]), np.sort(held[n_val:])
        else:
            self.val_windows, self.train_windows = np.zeros(0, np.int64), None  # all of them
        self.windows = windows - n_val
        if self.windows < self.global_batch:
            raise ValueError(f"corpus has {self.windows} training windows of {self.seq_len} "
                             f"tokens, fewer than one global batch ({self.global_batch}); use "
                             "more data or a smaller data.seq_len / data.batch_size")
        self._perm_epoch, self._perm = -1, None

    @property
    def val_batches(self) -> int:
        """Global batches the held-out windows fill (0 without val_fraction)."""
        return len(self.val_windows) // self.global_batch

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.windows)
            self._perm = perm if self.train_windows is None else self.train_windows[perm]
            self._perm_epoch = epoch
        return self._perm

    def _rows(self, windows: np.ndarray) -> torch.Tensor:
        rows = [self.tokens[w * self.seq_len:w * self.seq_len + self.seq_len + 1]
                for w in windows]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def batch(self, step: int) -> torch.Tensor:
        """[batch_size, seq_len + 1] int64 token ids of this rank for global step `step`."""
        per_epoch = self.windows // self.global_batch
        epoch, i = divmod(step, per_epoch)
        order = self._order(epoch)
        start = i * self.global_batch + self.rank * self.batch_size
        return self._rows(order[start:start + self.batch_size])

    def val_batch(self, i: int) -> torch.Tensor:
        """[batch_size, seq_len + 1] int64: this rank's rows of held-out global batch i
        (0 <= i < val_batches)."""
        if not 0 <= i < self.val_batches:
            raise IndexError(f"validation batch {i} outside 0 .. {self.val_batches - 1}")
        start = i * self.global_batch + self.rank * self.batch_size
        return self._rows(self.val_windows[start:start + self.batch_size])
