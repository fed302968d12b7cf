"""``oncofm train fusion --run RUN``: LoRA + projector fine-tuning with the shared training loop.

Writes ``models/fusion/``: ``projector.safetensors`` (fused-embedding stand-ins + projector),
``adapter/`` (peft LoRA), ``config.yaml`` (these settings + the embedding widths), ``history.jsonl``.
The real run is bounded by ``max_train_patients`` / ``max_val_patients`` (documented in docs/fusion.md).
"""

from __future__ import annotations

import functools
import logging
import shutil
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import yaml
from pydantic import Field

from oncofm.config import StageSettings
from oncofm.errors import OncoFMError
from oncofm.fusion.artifacts import FusionArtifacts
from oncofm.fusion.llm import LLMSettings, load_llm
from oncofm.paths import RunLayout
from oncofm.training import TrainSettings

log = logging.getLogger(__name__)

__all__ = ["FusionSettings", "train_fusion", "build_fusion_model", "load_fusion_model", "fusion_items",
           "inference_dtype"]



def _default_train() -> TrainSettings:
    # one epoch over the tcga13 training split fits the 45-minute budget on a 2-core CPU with bf16 autocast
    return TrainSettings(epochs=1, batch_size=8, lr=1e-3, weight_decay=0.0, patience=1, warmup_fraction=0.05,
                         mixed_precision="auto")


class FusionSettings(StageSettings):
    stage: ClassVar[str] = "fusion"

    run: str
    llm: LLMSettings = Field(default_factory=LLMSettings)
    projector: str = Field("mlp2x_gelu", description="registered projector name (linear | mlp2x_gelu)")
    n_soft_tokens: int = Field(4, ge=1, le=64)
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"],
                                    description="module names that get LoRA adapters (Llama/Qwen2/Gemma names)")
    train: TrainSettings = Field(default_factory=_default_train)
    max_train_patients: int = Field(0, ge=0, description="0 = every labelled training patient; else a seeded sample")
    max_val_patients: int = Field(64, ge=0, description="validation patients for the epoch loss (0 = all)")
    max_eval_patients: int = Field(0, ge=0, description="test patients generated for evaluation (0 = all)")
    max_new_tokens: int = Field(200, ge=16)
    gen_batch_size: int = Field(16, ge=1)
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = torch default)")
    redo: bool = False


def _sample(ids: list[int], n: int, seed: int) -> list[int]:
    if n <= 0 or len(ids) <= n:
        return ids
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(ids, size=n, replace=False).tolist())


def build_fusion_model(llm: Any, d_omics: int, d_slide: int, settings: FusionSettings) -> Any:
    """Wrap ``llm`` with LoRA and add the fused-embedding stand-ins and the projector (only these train)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from oncofm.fusion.fuse import FusedEmbedding
    from oncofm.fusion.model import FusionLLM
    from oncofm.fusion.projector import build_projector

    for p in llm.parameters():
        p.requires_grad_(False)
    names = {n.rsplit(".", 1)[-1] for n, _ in llm.named_modules()}
    targets = [t for t in settings.lora_targets if t in names]
    if not targets:
        raise OncoFMError(f"none of lora_targets {settings.lora_targets} is a module of this LLM; "
                          f"pick from e.g. {sorted(n for n in names if 'proj' in n)}")
    peft_model = get_peft_model(llm, LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                                                lora_dropout=settings.lora_dropout, target_modules=targets,
                                                task_type="CAUSAL_LM"))
    emb_w = llm.get_input_embeddings().weight.detach()
    hidden = emb_w.shape[1]
    out_scale = float(emb_w.norm(dim=1).mean() / hidden ** 0.5)  # soft tokens start at a typical token norm
    fusion = FusedEmbedding(d_omics, d_slide)
    projector = build_projector(settings.projector, d_in=fusion.d_out, d_llm=hidden,
                                n_tokens=settings.n_soft_tokens, out_scale=out_scale)
    model = FusionLLM(peft_model, fusion, projector)
    model.to(torch.float32 if emb_w.dtype == torch.float32 else emb_w.dtype)
    return model


def fusion_items(tokenizer: Any, records: list[dict], run: str | Path, *, with_target: bool,
                 dims: tuple[int, int] | None = None) -> list[Any]:
    """Tokenised :class:`~oncofm.fusion.model.FusionItem` for ``records`` with their embeddings."""
    from oncofm.fusion.fuse import load_embeddings, reasoning_slide_branch
    from oncofm.fusion.model import encode_item

    ids = [r["patient_id"] for r in records]
    emb = load_embeddings(run, ids, omics_dim=dims[0] if dims else 0, slide_dim=dims[1] if dims else 0,
                          slide_branch=reasoning_slide_branch(run))
    if dims and (emb.omics.shape[1], emb.slide.shape[1]) != tuple(dims):
        raise OncoFMError(f"embedding widths {(emb.omics.shape[1], emb.slide.shape[1])} differ from the trained "
                          f"fusion model's {tuple(dims)}; retrain with `oncofm train fusion --redo`")
    return [encode_item(tokenizer, r, emb.omics[i], emb.slide[i], emb.has_omics[i], emb.has_slide[i],
                        with_target=with_target) for i, r in enumerate(records)]


def _reasoning_evidence_settings(layout: RunLayout) -> dict[str, Any]:
    """The evidence settings the reasoning dataset was built with (its saved settings; else the defaults)."""
    from oncofm.fusion.evidence import EvidenceSettings

    path = layout.settings_file("reasoning")
    saved = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    return EvidenceSettings(**(saved.get("evidence") or {})).model_dump(mode="json")


def train_fusion(settings: FusionSettings) -> dict[str, Path]:
    """Fine-tune projector + LoRA on the reasoning dataset; returns the artifact paths."""
    import torch
    from safetensors.torch import save_file

    from oncofm.fusion.fuse import reasoning_slide_branch
    from oncofm.fusion.model import FusionTask, collate
    from oncofm.fusion.reasoning import read_dataset
    from oncofm.io import write_text
    from oncofm.training import clear_checkpoint, fit

    layout = RunLayout(settings.run)
    out = FusionArtifacts.of(layout.root).dir
    paths = FusionArtifacts.of(settings.run).outputs()
    from oncofm.config import artifact_version, check_stage, write_stamp

    # the model depends on these settings and on the reasoning dataset; it is reused only when both match
    stamp_args: dict[str, Any] = {
        "ignore": ("redo", "threads", "gen_batch_size", "max_new_tokens", "max_eval_patients", "llm.cache_dir",
                   "train.num_workers"),
        "inputs": {"reasoning/dataset.jsonl": artifact_version(layout.reasoning_dir / "dataset.jsonl")}}
    if check_stage(settings, layout.settings_file(settings.stage), list(paths.values()), on_change="stop",
                   what=f"the fusion model in {out}", **stamp_args):
        log.info("%s holds a fusion model trained with these settings; skipping (use --redo to retrain)", out)
        return paths
    if settings.redo and out.exists():
        for name in ("fit", "adapter"):
            shutil.rmtree(out / name, ignore_errors=True)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    records = read_dataset(settings.run)
    train_idx = [i for i, r in enumerate(records) if r["split"] == "train" and r.get("target")]
    val_idx = [i for i, r in enumerate(records) if r["split"] == "val" and r.get("target")]
    if not train_idx:
        raise OncoFMError("no training patient has a target text; rebuild with `oncofm reasoning --run RUN`")
    train_idx = _sample(train_idx, settings.max_train_patients, settings.train.seed)
    val_idx = _sample(val_idx, settings.max_val_patients, settings.train.seed + 1)
    llm, tokenizer = load_llm(settings.llm)
    train_items = fusion_items(tokenizer, [records[i] for i in train_idx], settings.run, with_target=True)
    val_items = fusion_items(tokenizer, [records[i] for i in val_idx], settings.run, with_target=True)
    d_omics, d_slide = train_items[0].omics.shape[0], train_items[0].slide.shape[0]
    torch.manual_seed(settings.train.seed)  # the projector's and LoRA's initial weights: the same on every run
    model = build_fusion_model(llm, d_omics, d_slide, settings)
    n_train = sum(p.numel() for p in model.trainable_parameters())
    lengths = [len(it.prompt_ids) + len(it.target_ids or []) for it in train_items]
    log.info("fusion: %d training / %d validation patients, %d trainable parameters, %d-%d tokens per row",
             len(train_items), len(val_items), n_train, min(lengths), max(lengths))
    result = fit(model, train_items, val_items or None, FusionTask(), settings.train, out / "fit",
                 parameters=model.trainable_parameters(),
                 collate_fn=functools.partial(collate, pad_id=tokenizer.pad_token_id))
    clear_checkpoint(out / "fit")
    best = out / "fit" / "best_model.pt"
    if best.exists():
        best.unlink()  # the full state (frozen LLM included) is not needed: projector + adapter are saved below
    out.mkdir(parents=True, exist_ok=True)
    head = {f"fusion.{k}": v.contiguous() for k, v in model.fusion.state_dict().items()}
    head.update({f"projector.{k}": v.contiguous() for k, v in model.projector.state_dict().items()})
    tmp = out / ".projector.safetensors.tmp"
    save_file(head, str(tmp))
    tmp.replace(paths["weights"])
    tmp_dir = out / ".adapter.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model.llm.save_pretrained(str(tmp_dir))
    shutil.rmtree(paths["adapter"], ignore_errors=True)
    tmp_dir.rename(paths["adapter"])
    cfg = {"settings": settings.model_dump(mode="json"), "d_omics": d_omics, "d_slide": d_slide,
           # how the training records' evidence was built: `explain` builds a new patient's the same way
           "evidence": _reasoning_evidence_settings(layout), "slide_branch": reasoning_slide_branch(layout.root),
           "n_train_patients": len(train_items), "n_val_patients": len(val_items),
           "best_epoch": result.best_epoch, "best_val_loss": result.best_metric, "epochs_run": result.epochs_run,
           "train_seconds": round(result.seconds, 1), "trainable_parameters": n_train,
           "history": result.history}
    write_text(yaml.safe_dump(cfg, sort_keys=False), paths["config"])
    write_stamp(settings, layout.settings_file(settings.stage), **stamp_args)
    log.info("fusion trained in %.0f s (best epoch %d, val loss %.4f): %s", result.seconds, result.best_epoch,
             result.best_metric, out)
    return paths


def inference_dtype(precision: str = "auto") -> Any:
    """The dtype generation runs in: ``fp32``, ``bf16``, or ``auto`` = bf16 where the CPU runs it natively
    (:func:`oncofm.training.native_bf16`; batches ~1.7x faster on an AMX CPU), else fp32. Generation runs on
    the CPU (the loaded model is not moved to a GPU)."""
    import torch

    from oncofm.training import native_bf16

    if precision not in ("auto", "fp32", "bf16"):
        raise OncoFMError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    use = precision == "bf16" or (precision == "auto" and native_bf16("cpu"))
    return torch.bfloat16 if use else torch.float32


def load_fusion_model(run: str | Path, llm_settings: LLMSettings | None = None, precision: str = "fp32",
                      merge: bool = False) -> tuple[Any, Any, dict]:
    """``(model, tokenizer, config)`` of the trained fusion model in ``RUN/models/fusion`` (eval mode), its
    weights in the dtype of ``precision`` (:func:`inference_dtype`). ``merge`` folds the LoRA adapters into
    the base weights (faster generation; ``disable_adapter()`` then unmerges on the fly)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from oncofm.fusion.fuse import FusedEmbedding
    from oncofm.fusion.model import FusionLLM
    from oncofm.fusion.projector import build_projector

    layout = RunLayout(run)
    out = FusionArtifacts.of(layout.root).dir
    layout.require(out / "config.yaml", "Run `oncofm train fusion --run RUN` first.")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    settings = FusionSettings.build(**cfg["settings"])
    llm, tokenizer = load_llm(llm_settings or settings.llm)
    peft_model = PeftModel.from_pretrained(llm, str(out / "adapter"))
    fusion = FusedEmbedding(cfg["d_omics"], cfg["d_slide"])
    hidden = llm.get_input_embeddings().weight.shape[1]
    projector = build_projector(settings.projector, d_in=fusion.d_out, d_llm=hidden, n_tokens=settings.n_soft_tokens)
    state = load_file(str(out / "projector.safetensors"))
    fusion.load_state_dict({k[len("fusion."):]: v for k, v in state.items() if k.startswith("fusion.")})
    projector.load_state_dict({k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")})
    model = FusionLLM(peft_model, fusion, projector)
    model.to(inference_dtype(precision))
    if merge:
        peft_model.merge_adapter()
    model.eval()
    return model, tokenizer, cfg
