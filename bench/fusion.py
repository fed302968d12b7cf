"""Fusion benchmark: fine-tuning time on the whole tcga13 training split and one explanation, vs targets.

    .venv/bin/python bench/fusion.py --run RUN [--steps 4] [--threads 1]

RUN must hold ``reasoning/dataset.jsonl`` (``oncofm reasoning``) and, for the explanation timing, a trained
``models/fusion`` (``oncofm train fusion``). Builds the default fusion model (SmolLM2-135M + LoRA +
mlp2x_gelu projector), times ``--steps`` optimiser steps (batch 8) on real training records, projects one
epoch over every labelled training patient, and times one explanation (batch of one, greedy, up to 200 new
tokens). Prints each measurement beside its target (45 min for fine-tuning, 20 s per explanation) and the
ratio.
"""

from __future__ import annotations

import argparse
import random
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from oncofm.fusion.llm import load_llm
    from oncofm.fusion.model import FusionTask, collate
    from oncofm.fusion.reasoning import read_dataset
    from oncofm.fusion.train import FusionSettings, build_fusion_model, fusion_items

    torch.set_num_threads(args.threads)
    records = read_dataset(args.run)
    train = [r for r in records if r["split"] == "train" and r["target"]]
    random.Random(0).shuffle(train)
    llm, tok = load_llm()
    items = fusion_items(tok, train[: 8 * args.steps], args.run, with_target=True)
    model = build_fusion_model(llm, items[0].omics.shape[0], items[0].slide.shape[0], FusionSettings(run=args.run))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    model.train()
    t0 = time.perf_counter()
    for s in range(args.steps):
        loss = FusionTask().loss(model, collate(items[8 * s: 8 * s + 8], tok.pad_token_id))
        loss.backward()
        opt.step()
        opt.zero_grad()
    per_patient = (time.perf_counter() - t0) / (8 * args.steps)
    epoch_min = per_patient * len(train) / 60
    print(f"fine-tuning: {per_patient:.2f} s per patient -> one epoch over {len(train)} labelled training "
          f"patients {epoch_min:.1f} min | target 45 min | ratio {epoch_min / 45:.2f}")

    from pathlib import Path

    if (Path(args.run) / "models" / "fusion" / "config.yaml").exists():
        from oncofm.fusion.explain import explain_patient
        from oncofm.fusion.fuse import load_embeddings

        rec = next(r for r in records if r["split"] == "test" and r["label"] is not None)
        emb = load_embeddings(args.run, [rec["patient_id"]])
        explain_patient(args.run, rec["evidence"], {"omics": emb.omics[0], "slide": None}, max_new_tokens=8)
        t1 = time.perf_counter()
        text, parsed = explain_patient(args.run, rec["evidence"], {"omics": emb.omics[0], "slide": None})
        sec = time.perf_counter() - t1
        print(f"one explanation: {sec:.1f} s ({len(tok(text)['input_ids'])} tokens, parsed={parsed is not None}) "
              f"| target 20 s | ratio {sec / 20:.2f}")


if __name__ == "__main__":
    main()
