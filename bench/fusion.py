"""Fusion benchmark: fine-tuning time on the whole tcga13 training split and one explanation, vs targets.

    .venv/bin/python bench/fusion.py --run RUN [--steps 3] [--threads 2]

RUN must hold ``reasoning/dataset.jsonl`` (``oncofm reasoning``) and, for the explanation timing, a trained
``models/fusion`` (``oncofm train fusion``). Builds the default fusion model (SmolLM2-135M + LoRA +
mlp2x_gelu projector) and times ``--steps`` optimiser steps (batch 8) on the same real training records in
fp32 and under bf16 autocast (what ``mixed_precision: auto`` picks on an AMX / AVX512-BF16 CPU), side by
side, projecting one epoch over every labelled training patient; then one explanation (batch of one, greedy,
up to 200 new tokens) with the model in fp32 + merged LoRA (the product path) and in bf16, side by side.
Each line prints the measurement, its target (45 min for fine-tuning, 20 s per explanation) and the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from oncofm.fusion.llm import load_llm
    from oncofm.fusion.model import FusionTask, collate
    from oncofm.fusion.reasoning import read_dataset
    from oncofm.fusion.train import FusionSettings, build_fusion_model, fusion_items
    from oncofm.training import native_bf16

    torch.set_num_threads(args.threads)
    records = read_dataset(args.run)
    train = [r for r in records if r["split"] == "train" and r["target"]]
    random.Random(0).shuffle(train)
    llm, tok = load_llm()
    items = fusion_items(tok, train[: 8 * args.steps], args.run, with_target=True)
    model = build_fusion_model(llm, items[0].omics.shape[0], items[0].slide.shape[0], FusionSettings(run=args.run))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    model.train()

    def per_patient(bf16: bool) -> float:
        t0 = time.perf_counter()
        for s in range(args.steps):
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with ctx:
                loss = FusionTask().loss(model, collate(items[8 * s: 8 * s + 8], tok.pad_token_id))
            loss.backward()
            opt.step()
            opt.zero_grad()
        return (time.perf_counter() - t0) / (8 * args.steps)

    modes = {"fp32": False, "bf16 autocast": True} if native_bf16("cpu") else {"fp32": False}
    times = {name: per_patient(flag) for name, flag in modes.items()}
    for name, sec in times.items():
        epoch_min = sec * len(train) / 60
        print(f"fine-tuning ({name}): {sec:.2f} s per patient -> one epoch over {len(train)} labelled training "
              f"patients {epoch_min:.1f} min | target 45 min | ratio {epoch_min / 45:.2f}")
    if len(times) == 2:
        print(f"bf16 autocast vs fp32 training step: {times['fp32'] / times['bf16 autocast']:.2f}x faster")

    if not (Path(args.run) / "models" / "fusion" / "config.yaml").exists():
        return
    from oncofm.fusion.fuse import load_embeddings
    from oncofm.fusion.generate import generate_texts
    from oncofm.fusion.train import load_fusion_model

    rec = next(r for r in records if r["split"] == "test" and r["label"] is not None)
    emb = load_embeddings(args.run, [rec["patient_id"]])
    one = {}
    for name, kw in {"fp32 + merged LoRA (product path)": {"precision": "fp32", "merge": True},
                     "bf16": {"precision": "bf16"}}.items():
        fm, ftok, cfg = load_fusion_model(args.run, **kw)
        item = fusion_items(ftok, [rec], args.run, with_target=False, dims=(cfg["d_omics"], cfg["d_slide"]))
        generate_texts(fm, ftok, item, max_new_tokens=4, batch_size=1, progress=False)  # warm-up
        t1 = time.perf_counter()
        text = generate_texts(fm, ftok, item, batch_size=1, progress=False)[0]
        one[name] = time.perf_counter() - t1
        print(f"one explanation ({name}): {one[name]:.1f} s ({len(ftok(text)['input_ids'])} tokens) "
              f"| target 20 s | ratio {one[name] / 20:.2f}")
        del fm
    a, b = one.values()
    print(f"product path vs bf16 for one explanation: {b / a:.2f}x faster (patient {rec['patient_id']}, "
          f"embedding from {emb.omics.shape[1]}-d omics)")


if __name__ == "__main__":
    main()
