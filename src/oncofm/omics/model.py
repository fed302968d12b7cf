"""The omics model: a feature-tokenizer transformer over (expression, Cox coefficient) gene tokens.

Tokens (all of width ``d_model``)::

    [CLS] [cancer type] [age] [sex] [gene_1] ... [gene_G]

- gene token ``g`` of a patient with normalised expression ``x`` and Cox coefficient ``c`` (of gene ``g``
  for the patient's cancer type): ``E_g + x * W_g + c * u + (x * c) * v`` — ``E_g`` is the learned
  gene-identity embedding, ``W_g`` a per-gene value direction (as FT-Transformer's numerical tokenizer),
  ``u`` and ``v`` shared directions for the coefficient and for ``x * c`` (the gene's univariate Cox
  log-hazard contribution);
- cancer type: an embedding (index 0 = a type unseen in training); age: ``a * w + b`` (its own embedding
  when unknown); sex: an embedding (unknown / female / male);
- a pre-norm transformer encoder; the final CLS state, layer-normalised, is the penultimate embedding;
  a linear head gives the logit of P(death within the horizon). With ``linear_skip`` a linear model on the
  same inputs (x and x·c of every gene, cancer type, age) is added to that logit (wide & deep). The same logit is the risk score of the
  auxiliary Cox loss (see :mod:`oncofm.omics.train`).

Shape
-----
- Input: ``pairs`` (B, G, 2), ``cancer`` (B,) int64, ``age`` (B,) float (NaN = unknown), ``sex`` (B,) int64
- Output: ``logits`` (B,), ``embedding`` (B, d_model), or (B, d_model + 1) with the wide path: the CLS state
  and the wide path's logit, so that the model's own logit is a linear function of its embedding and a fused
  head (fusion stage) can start from the anchored prediction instead of losing it
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["OmicsTransformer", "MODELS", "create_model", "model_inputs"]


class GeneTokenizer(nn.Module):
    """(B, G, 2) pairs → (B, G, d) tokens."""

    def __init__(self, *, n_genes: int, d_model: int) -> None:
        super().__init__()
        self.identity = nn.Parameter(torch.empty(n_genes, d_model))  # E_g
        self.value = nn.Parameter(torch.empty(n_genes, d_model))  # W_g
        self.coef = nn.Parameter(torch.empty(d_model))  # u
        self.interaction = nn.Parameter(torch.empty(d_model))  # v
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.identity.shape[1])
        for p in (self.identity, self.value, self.coef, self.interaction):
            nn.init.uniform_(p, -bound, bound)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        x, c = pairs[..., 0:1], pairs[..., 1:2]  # (B, G, 1) each
        return self.identity + x * self.value + c * self.coef + (x * c) * self.interaction  # (B, G, d)


class OmicsTransformer(nn.Module):
    """FT-Transformer-style survival classifier over gene tokens (see the module docstring)."""

    def __init__(self, *, n_genes: int, n_cancer_types: int, d_model: int = 64, n_layers: int = 2,
                 n_heads: int = 4, ffn_factor: float = 2.0, dropout: float = 0.1,
                 attention_dropout: float = 0.1, linear_skip: bool = False, gene_dropout: float = 0.0,
                 layers: dict[str, int] | None = None, covariates: list[str] | None = None) -> None:
        super().__init__()
        if n_genes < 1:
            raise ValueError(f"need at least one gene token, got {n_genes=}")
        if n_cancer_types < 1:
            raise ValueError(f"need at least the unknown cancer type, got {n_cancer_types=}")
        if d_model < 1 or d_model % n_heads:
            raise ValueError(f"d_model must be a positive multiple of n_heads, got {d_model=}, {n_heads=}")
        if n_layers < 1:
            raise ValueError(f"{n_layers=} must be >= 1")
        if not (0 <= dropout < 1 and 0 <= attention_dropout < 1):
            raise ValueError(f"dropouts must be in [0, 1), got {dropout=}, {attention_dropout=}")
        if not 0 <= gene_dropout < 1:
            raise ValueError(f"{gene_dropout=} must be in [0, 1)")
        if ffn_factor <= 0:
            raise ValueError(f"{ffn_factor=} must be > 0")
        self.config = {"n_genes": n_genes, "n_cancer_types": n_cancer_types, "d_model": d_model,
                       "n_layers": n_layers, "n_heads": n_heads, "ffn_factor": ffn_factor, "dropout": dropout,
                       "attention_dropout": attention_dropout, "linear_skip": linear_skip,
                       "gene_dropout": gene_dropout}
        layers = {k: int(v) for k, v in (layers or {}).items() if int(v) > 0}
        covariates = list(covariates or [])
        if layers:  # only then: a model without them keeps exactly its old parameters and config
            self.config["layers"] = layers
        if covariates:
            self.config["covariates"] = covariates
        self.genes = GeneTokenizer(n_genes=n_genes, d_model=d_model)
        self.cancer = nn.Embedding(n_cancer_types, d_model)
        self.sex = nn.Embedding(3, d_model)
        self.age_weight = nn.Parameter(torch.empty(d_model))
        self.age_bias = nn.Parameter(torch.empty(d_model))
        self.age_missing = nn.Parameter(torch.empty(d_model))
        self.cls = nn.Parameter(torch.empty(d_model))
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=int(ffn_factor * d_model),
                                           dropout=dropout, activation="gelu", batch_first=True, norm_first=True)
        layer.self_attn.dropout = attention_dropout
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 1)
        # wide part (optional): a linear model on the same inputs added to the logit, so the encoder
        # learns the residual over a penalised-logistic / Cox-like prognostic index
        self.skip = nn.ModuleDict({"genes": nn.Linear(2 * n_genes, 1), "cancer": nn.Embedding(n_cancer_types, 1),
                                   "clinical": nn.Linear(2, 1)}) if linear_skip else None
        # further omics layers: a tokenizer per layer and a layer embedding (index 0 = expression); absent
        # values are masked from attention; covariates (stage, grade) are embedded tokens (0 = unknown)
        self.layer_tokenizers = nn.ModuleDict({k: GeneTokenizer(n_genes=v, d_model=d_model) for k, v in layers.items()}) \
            if layers else None
        self.layer_embedding = nn.Parameter(torch.empty(1 + len(layers), d_model)) if layers else None
        self.covariate_embeddings = nn.ModuleDict({c: nn.Embedding(5, d_model) for c in covariates}) \
            if covariates else None
        if linear_skip and layers:
            self.skip["layers"] = nn.Linear(sum(v + 1 for v in layers.values()), 1)
        if linear_skip and covariates:
            self.skip["covariates"] = nn.Linear(5 * len(covariates), 1)
        self.reset_parameters()

    @property
    def d_model(self) -> int:
        return int(self.config["d_model"])

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.d_model)
        self.genes.reset_parameters()
        for p in (self.age_weight, self.age_bias, self.age_missing, self.cls):
            nn.init.uniform_(p, -bound, bound)
        nn.init.normal_(self.cancer.weight, std=bound)
        nn.init.normal_(self.sex.weight, std=bound)
        for layer in self.encoder.layers:
            for m in layer.modules():
                if isinstance(m, nn.Linear | nn.LayerNorm) or hasattr(m, "_reset_parameters"):
                    (m.reset_parameters if hasattr(m, "reset_parameters") else m._reset_parameters)()
        self.norm.reset_parameters()
        self.head.reset_parameters()
        if self.skip is not None:
            for m in self.skip.values():
                nn.init.zeros_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        if self.layer_tokenizers is not None:
            for tok in self.layer_tokenizers.values():
                tok.reset_parameters()
            nn.init.normal_(self.layer_embedding, std=bound)
        if self.covariate_embeddings is not None:
            for emb in self.covariate_embeddings.values():
                nn.init.normal_(emb.weight, std=bound)

    def set_linear_anchor(self, genes: Any, cancer: Any, clinical: Any, bias: float, *, layers: Any = None,
                          covariates: Any = None, freeze: bool = True) -> None:
        """Copy a fitted linear model into the wide path and zero the transformer head (residual learning).

        ``genes`` (2G,) weights of ``[x, x·c]``, ``cancer`` (n_cancer_types,), ``clinical`` (2,) weights of
        ``[age z, age missing]``, ``bias`` the intercept: the model then starts as exactly that linear model
        and the encoder learns the residual. ``freeze`` keeps the anchor fixed during training.
        """
        if self.skip is None:
            raise ValueError("set_linear_anchor needs a model built with linear_skip=True")
        with torch.no_grad():
            self.skip["genes"].weight.copy_(torch.as_tensor(genes, dtype=torch.float32).reshape(1, -1))
            self.skip["genes"].bias.fill_(float(bias))
            self.skip["cancer"].weight.copy_(torch.as_tensor(cancer, dtype=torch.float32).reshape(-1, 1))
            self.skip["clinical"].weight.copy_(torch.as_tensor(clinical, dtype=torch.float32).reshape(1, -1))
            self.skip["clinical"].bias.zero_()
            for key, w in (("layers", layers), ("covariates", covariates)):
                if key in self.skip:
                    if w is None:
                        raise ValueError(f"the model has a {key} path: give its anchor weights")
                    self.skip[key].weight.copy_(torch.as_tensor(w, dtype=torch.float32).reshape(1, -1))
                    self.skip[key].bias.zero_()
            self.head.weight.zero_()
            self.head.bias.zero_()
        for p in self.skip.parameters():
            p.requires_grad_(not freeze)

    def tokens(self, pairs: torch.Tensor, cancer: torch.Tensor, age: torch.Tensor,
               sex: torch.Tensor) -> torch.Tensor:
        """The input sequence (B, 4 + G, d)."""
        b = pairs.shape[0]
        missing = torch.isnan(age)[:, None]  # (B, 1)
        a = torch.nan_to_num(age)[:, None]
        age_tok = torch.where(missing, self.age_missing, a * self.age_weight + self.age_bias)  # (B, d)
        clinical = torch.stack([self.cls.expand(b, -1), self.cancer(cancer), age_tok, self.sex(sex)], 1)
        return torch.cat([clinical, self.genes(pairs)], dim=1)

    def _extra_tokens(self, extra: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Tokens and padding masks of the further layers (NaN value = not measured: masked) and covariates."""
        toks, masks = [], []
        if self.layer_tokenizers is not None:
            for i, (name, tok) in enumerate(self.layer_tokenizers.items()):
                v = extra[f"layer_{name}"]  # (B, F, 2)
                missing = torch.isnan(v[..., 0])  # (B, F)
                toks.append(tok(torch.nan_to_num(v)) + self.layer_embedding[i + 1])
                masks.append(missing)
        if self.covariate_embeddings is not None:
            for name, emb in self.covariate_embeddings.items():
                toks.append(emb(extra[f"cov_{name}"])[:, None])  # (B, 1, d); level 0 = unknown
                masks.append(torch.zeros(toks[-1].shape[:2], dtype=torch.bool, device=toks[-1].device))
        return toks, masks

    def _extra_wide(self, extra: dict[str, torch.Tensor]) -> torch.Tensor | int:
        """The wide path's terms of the further layers (values 0 where missing, plus an absent-layer flag)."""
        out: torch.Tensor | int = 0
        if self.layer_tokenizers is not None and "layers" in self.skip:
            cols = []
            for name in self.layer_tokenizers:
                v = extra[f"layer_{name}"]
                x = torch.nan_to_num(v[..., 0])
                absent = torch.isnan(v[..., 0]).all(dim=1, keepdim=True).to(x.dtype)
                cols += [x, absent]  # as oncofm.omics.baselines.layer_design
            out = out + self.skip["layers"](torch.cat(cols, 1)).squeeze(-1)
        if self.covariate_embeddings is not None and "covariates" in self.skip:
            onehot = [torch.nn.functional.one_hot(extra[f"cov_{c}"], 5)[:, [1, 2, 3, 4, 0]].float()
                      for c in self.covariate_embeddings]
            out = out + self.skip["covariates"](torch.cat(onehot, 1)).squeeze(-1)
        return out

    def forward(self, pairs: torch.Tensor, cancer: torch.Tensor, age: torch.Tensor,
                sex: torch.Tensor, extra: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B,), embedding (B, d))``; with the wide path, ``(B, d + 1)``: the CLS state and the wide
        logit (see :meth:`forward`'s end). ``extra``: ``layer_<name>`` (B, F, 2) pairs with NaN where not
        measured and ``cov_<name>`` (B,) levels 0-4, for a model built with ``layers`` / ``covariates``."""
        if pairs.ndim != 3 or pairs.shape[1:] != (self.config["n_genes"], 2):
            raise ValueError(f"pairs must be (B, {self.config['n_genes']}, 2), got {tuple(pairs.shape)}")
        has_extra = self.layer_tokenizers is not None or self.covariate_embeddings is not None
        if has_extra and extra is None:
            raise ValueError("this model has further layers / covariates: pass extra= (see model_inputs)")
        tokens = self.tokens(pairs, cancer, age, sex)  # (B, 4 + G, d)
        mask = None
        p_drop = float(self.config.get("gene_dropout", 0.0))
        if self.training and p_drop > 0:  # token dropout: each gene token is hidden from attention
            drop = torch.rand(pairs.shape[:2], device=pairs.device) < p_drop  # (B, G)
            mask = torch.cat([torch.zeros(pairs.shape[0], 4, dtype=torch.bool, device=pairs.device), drop], 1)
        if has_extra:
            if self.layer_embedding is not None:
                tokens = torch.cat([tokens[:, :4], tokens[:, 4:] + self.layer_embedding[0]], 1)
            toks, masks = self._extra_tokens(extra)
            if mask is None:
                mask = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=pairs.device)
            tokens = torch.cat([tokens, *toks], 1)
            mask = torch.cat([mask, *masks], 1)
        h = self.encoder(tokens, src_key_padding_mask=mask)  # (B, 4 + G [+ extra], d)
        embedding = self.norm(h[:, 0])  # (B, d) — the penultimate layer
        logits = self.head(embedding).squeeze(-1)  # (B,)
        if self.skip is not None:
            x = pairs[..., 0]  # (B, G)
            wide = torch.cat([x, x * pairs[..., 1]], dim=1)  # (B, 2G)
            clinical = torch.stack([torch.nan_to_num(age), torch.isnan(age).to(age.dtype)], 1)  # (B, 2)
            wide_logit = (self.skip["genes"](wide) + self.skip["cancer"](cancer)
                          + self.skip["clinical"](clinical)).squeeze(-1)  # (B,)
            if has_extra:
                wide_logit = wide_logit + self._extra_wide(extra)
            logits = logits + wide_logit
            # the penultimate representation of the whole model: its logit is linear in [CLS state, wide logit]
            # (head weights and 1), so a linear head on the embedding can reach the model's own prediction
            embedding = torch.cat([embedding, wide_logit[:, None]], dim=1)  # (B, d + 1)
        return logits, embedding


def model_inputs(batch: dict[str, Any]) -> tuple[Any, ...]:
    """The positional ``forward`` arguments from an :class:`~oncofm.omics.data.OmicsDataset` batch
    (``pairs, cancer, age, sex``, and a dict of the further layers / covariates when the batch has them)."""
    base = (batch["pairs"], batch["cancer"], batch["age"], batch["sex"])
    extra = {k: v for k, v in batch.items() if k.startswith(("layer_", "cov_"))}
    return (*base, extra) if extra else base


MODELS: dict[str, type[nn.Module]] = {"ft_transformer": OmicsTransformer}


def create_model(name: str = "ft_transformer", **kwargs: Any) -> nn.Module:
    """Build a registered omics model by name (keyword-only architecture arguments)."""
    if name not in MODELS:
        raise ValueError(f"unknown omics model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)
