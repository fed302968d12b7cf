"""Decoding of explanations: lookup-draft (speculative) greedy decoding is exact, and the verdict decoder
gives the same line whether or not it reuses the KV cache of the reasoning. Tiny random Llama in float64
(no download), so float rounding cannot flip a greedy choice."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from oncofm.fusion import generate as G


class _Wrap(nn.Module):
    """The part of FusionLLM the decoders use: ``.llm`` and its token embeddings."""

    def __init__(self, llm: nn.Module) -> None:
        super().__init__()
        self.llm = llm

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)


def _tiny(vocab: int) -> _Wrap:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return _Wrap(LlamaForCausalLM(cfg).double().eval())


@torch.no_grad()
def _plain_greedy(model: _Wrap, context: torch.Tensor, n: int) -> list[int]:
    """Reference: recompute the whole sequence at every step, no cache, no drafts."""
    out: list[int] = []
    for _ in range(n):
        emb = torch.cat([context, model.embed(torch.tensor(out, dtype=torch.long))]) if out else context
        out.append(int(model.llm(inputs_embeds=emb[None]).logits[0, -1].argmax()))
    return out


def test_lookup_draft_prefers_the_longest_ngram_and_stops_at_separators() -> None:
    history = [5, 6, 7, -1, 1, 2, 3, 4, 9, -1, 8, 2, 3, 1, 2, 3]
    # the last 3-gram (1, 2, 3) occurred before at positions 4-6: its continuation runs up to the separator
    assert G._lookup_draft(history, max_ngram=3, k=16) == [4, 9]
    assert G._lookup_draft(history, max_ngram=3, k=1) == [4]
    assert G._lookup_draft([1, 2, 3], max_ngram=3) == []  # no earlier occurrence of any n-gram


@pytest.mark.parametrize("drafts", ["none", "perfect", "garbage"])
def test_greedy_lookup_is_exactly_greedy_decoding(drafts: str) -> None:
    model = _tiny(vocab=50)
    prompt = torch.randint(3, 50, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    context = model.embed(torch.tensor(prompt))
    n = 40
    want = _plain_greedy(model, context, n)
    draft_ids = {"none": [], "perfect": want, "garbage": torch.randint(3, 50, (60,)).tolist()}[drafts]
    calls = []
    forward = model.llm.forward
    model.llm.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    tok = SimpleNamespace(eos_token_id=-7)  # never generated: decode all n tokens
    got, cache = G.greedy_lookup(model, tok, context, prompt, max_new_tokens=n, stop=lambda ids: False,
                                 drafts=draft_ids)
    assert got == want
    assert cache.get_seq_length() == len(prompt) + n - 1  # the context and every generated token but the last
    if drafts == "perfect":  # drafts that greedy agrees with are taken many tokens per pass
        assert len(calls) <= n // 4


def test_greedy_lookup_stops_at_eos_and_at_the_stop_rule() -> None:
    model = _tiny(vocab=50)
    prompt = list(range(3, 15))
    context = model.embed(torch.tensor(prompt))
    want = _plain_greedy(model, context, 30)
    eos = want[10]
    got, _ = G.greedy_lookup(model, SimpleNamespace(eos_token_id=eos), context, prompt, max_new_tokens=30,
                             stop=lambda ids: False, drafts=want)
    assert got == want[: want.index(eos) + 1]
    got, _ = G.greedy_lookup(model, SimpleNamespace(eos_token_id=-7), context, prompt, max_new_tokens=30,
                             stop=lambda ids: len(ids) >= 5, drafts=[])
    assert got == want[:5]


def _tokenizer(texts: list[str]):  # noqa: ANN202 — a transformers fast tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


def test_verdict_is_the_same_with_and_without_the_reused_cache() -> None:
    from transformers import DynamicCache

    from oncofm.fusion.parse import parse_prediction
    from oncofm.fusion.templates import draft_texts, render_target

    ev = {"cancer_type": "LUAD", "omics_prob": 0.64, "missing": ["slide"],
          "risk_genes": [{"gene": "PLK1", "z": 1.2, "cox": "+", "q": 0.03}],
          "protective_genes": [{"gene": "CD8A", "z": 0.8, "cox": "-", "q": 0.2}]}
    texts = [render_target(ev, death=d, risk=0.6, seed=s) for s in range(6) for d in (True, False)]
    tok = _tokenizer(texts * 3)
    model = _tiny(vocab=len(tok))
    prompt = tok("Explain: LUAD, omics 0.64", add_special_tokens=False)["input_ids"]
    context = model.embed(torch.tensor(prompt))
    reasoning = draft_texts(ev)[0]  # as if the LLM had written it
    generated = tok(reasoning + "\nPrediction:", add_special_tokens=False)["input_ids"]
    cache = DynamicCache()
    G._feed(model, cache, embeds=context)
    G._feed(model, cache, generated[:-1])  # what greedy_lookup leaves behind
    fresh = G.constrained_prediction(model, tok, context, prompt, reasoning)
    reused = G.constrained_prediction(model, tok, context, prompt, reasoning, generated=generated, cache=cache)
    assert reused == fresh
    for readout in G.READOUTS:
        text = G.constrained_prediction(model, tok, context, prompt, reasoning, readout=readout)
        parsed = parse_prediction(text)
        assert parsed is not None and parsed.death == (parsed.risk >= 0.5)
        assert text.startswith(G.split_closing(reasoning)[0])


def test_product_model_is_loaded_once_and_again_after_retraining(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import os

    from oncofm.fusion import predict
    from oncofm.paths import RunLayout

    loads = []
    monkeypatch.setattr(predict.FusionPredictor, "load",
                        classmethod(lambda cls, run, **kw: loads.append(kw) or ("predictor", len(loads))))
    predict._cached.cache_clear()
    projector = tmp_path / "models" / "fusion" / "projector.safetensors"
    projector.parent.mkdir(parents=True)
    projector.write_bytes(b"v1")
    first = predict.FusionPredictor.from_run(RunLayout(tmp_path))
    assert first == predict.FusionPredictor.from_run(RunLayout(str(tmp_path))) == ("predictor", 1)
    assert loads == [{"precision": "fp32", "merge": True}]  # once, in the product's precision
    stat = projector.stat()
    os.utime(projector, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # `oncofm train fusion --redo`
    predict.FusionPredictor.from_run(RunLayout(tmp_path))
    assert len(loads) == 2
    assert predict.FusionPredictor.from_run(RunLayout(tmp_path / "none")) is None  # no model: None, a note
    predict._cached.cache_clear()


def test_second_decimals_in_one_pass_equal_ten_passes_and_restore_the_cache() -> None:
    from transformers import DynamicCache

    model = _tiny(vocab=50)
    digits = list(range(20, 30))
    cache = DynamicCache()
    G._feed(model, cache, embeds=model.embed(torch.arange(3, 15)))
    base = cache.get_seq_length()
    got = G._second_decimals(model, cache, digits)
    assert cache.get_seq_length() == base + 1 and cache.layers[0].keys.shape[0] == 1  # one row again
    G._crop(cache, base)
    want = []
    for d in digits:  # one at a time, the cache cut back after each
        p = torch.softmax(G._feed(model, cache, [d])[-1, digits], dim=0)
        want.append(float((p * torch.arange(10, dtype=p.dtype)).sum()))
        G._crop(cache, base)
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6)


def _branch(death: bool, p_words: float, p1: list[float], e2: float = 0.0) -> G._Branch:
    return G._Branch(death, f"Prediction: {G.OUTCOMES[0 if death else 1]}", float(torch.tensor(p_words).log()),
                     torch.tensor(p1, dtype=torch.float32), torch.full((10,), e2))


def test_marginal_readout_weighs_both_outcomes_and_the_words_follow_the_number() -> None:
    one_hot = [[float(i == d) for i in range(10)] for d in range(10)]
    # death words with probability 0.8 and then "0.7x"; alive words 0.2 and then "0.2x"; E[x] = 5 in both
    death, risk = G._marginal([_branch(True, 0.8, one_hot[7], 5.0), _branch(False, 0.2, one_hot[2], 5.0)])
    assert risk == pytest.approx(0.8 * 0.75 + 0.2 * 0.25) and death
    # the words follow the written number even when the likelier words point the other way
    death, risk = G._marginal([_branch(True, 0.6, one_hot[5], 0.0), _branch(False, 0.4, one_hot[3], 0.0)])
    assert risk == pytest.approx(0.42) and not death
    # at the rounding edge the words follow the number as written: 0.4996 reads 0.50 → death
    death, risk = G._marginal([_branch(True, 0.5, one_hot[4], 9.96), _branch(False, 0.5, one_hot[4], 9.96)])
    assert f"{risk:.2f}" == "0.50" and death


def test_verdict_readout_restricts_the_risk_to_the_likelier_verdicts_side() -> None:
    p1 = [0.1] * 10
    death, risk = G._verdict_first([_branch(True, 0.3, p1, 0.0), _branch(False, 0.7, p1, 0.0)])
    assert not death and risk == pytest.approx(0.2)  # mean of 0.0 .. 0.4
    with pytest.raises(ValueError, match="read-out"):
        G._check_readout("median")
