"""Fusion benchmark: fine-tuning time on the whole tcga13 training split and one explanation, vs targets.

    .venv/bin/python bench/fusion.py --run RUN [--steps 3] [--threads 2] [--patients 5] [--skip-training]

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
    ap.add_argument("--patients", type=int, default=5, help="test patients explained one at a time")
    ap.add_argument("--skip-training", action="store_true", help="time only the explanations")
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
    if not args.skip_training:
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
    from oncofm.fusion.generate import generate_texts
    from oncofm.fusion.predict import FusionPredictor
    from oncofm.paths import RunLayout

    recs = [r for r in records if r["split"] == "test" and r["label"] is not None][: args.patients]
    predictor = FusionPredictor.from_run(RunLayout(args.run))  # fp32, LoRA merged: what `oncofm explain` runs
    fm, ftok, cfg = predictor.model, predictor.tokenizer, predictor.config
    items = fusion_items(ftok, recs, args.run, with_target=False, dims=(cfg["d_omics"], cfg["d_slide"]))
    generate_texts(fm, ftok, items[:1], max_new_tokens=4, batch_size=1, progress=False)  # warm-up
    secs: dict[str, list[float]] = {"lookup drafts (product path)": [], "plain greedy": []}
    for item in items:  # the two decoders alternate patient by patient, so machine load hits both alike
        texts = {}
        for name, draft in (("lookup drafts (product path)", 16), ("plain greedy", 0)):
            t1 = time.perf_counter()
            texts[name] = generate_texts(fm, ftok, [item], batch_size=1, progress=False, draft=draft)[0]
            secs[name].append(time.perf_counter() - t1)
        same = texts["plain greedy"].split("Prediction:")[0] == texts["lookup drafts (product path)"].split("Prediction:")[0]
        print(f"  {item.patient_id}: {secs['lookup drafts (product path)'][-1]:.1f} s with drafts, "
              f"{secs['plain greedy'][-1]:.1f} s plain ({len(ftok(texts['plain greedy'])['input_ids'])} tokens; "
              f"same reasoning: {same})")
    med = {k: sorted(v)[len(v) // 2] for k, v in secs.items()}
    for name, sec in med.items():
        print(f"one explanation ({name}, fp32 + merged LoRA): median {sec:.1f} s, max {max(secs[name]):.1f} s over "
              f"{len(items)} test patients | target 20 s | ratio {sec / 20:.2f}")
    print(f"lookup drafts vs plain greedy: {med['plain greedy'] / med['lookup drafts (product path)']:.2f}x faster")


if __name__ == "__main__":
    main()
