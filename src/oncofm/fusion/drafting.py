"""Drafting explanations through any OpenAI-compatible chat endpoint, and the expert review loop.

``draft_explanations`` sends each evidence record to ``POST {base_url}/chat/completions`` (OpenAI, vLLM,
llama.cpp server, Ollama's ``/v1``, ...): base URL and model by setting, the API key read from the
environment variable named by ``api_key_env`` (never from a file or the settings). A draft without a
well-formed prediction line gets the canonical line appended (from the record's risk and true outcome),
so every draft stays parseable.

Review loop: :func:`export_for_review` writes a CSV or JSONL with ``patient_id, evidence, draft,
corrected, approved``; an expert edits ``corrected`` / ``approved``; :func:`import_reviewed` reads it back
and replaces the targets of the approved records in ``reasoning/dataset.jsonl`` (corrected text, or the
draft when ``corrected`` is empty).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from oncofm.errors import OncoFMError
from oncofm.fusion.evidence import evidence_prompt
from oncofm.fusion.parse import format_prediction, parse_prediction
from oncofm.io import atomic_path

log = logging.getLogger(__name__)

__all__ = ["DraftSettings", "ChatClient", "draft_explanations", "export_for_review", "import_reviewed"]

DRAFT_SYSTEM = ("You are an oncologist writing a short, factual explanation of a 5-year survival prognosis. "
                "Use only the evidence given: name only the genes listed, copy numbers exactly. End with the "
                "exact line given by the user.")


class DraftSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    base_url: str = Field("http://127.0.0.1:8000/v1", description="OpenAI-compatible API root (…/v1)")
    model: str = Field("gpt-4o-mini", description="model name sent to the endpoint")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    temperature: float = Field(0.3, ge=0, le=2)
    max_tokens: int = Field(400, ge=16)
    timeout_s: float = Field(60.0, gt=0)


class ChatClient:
    """Minimal OpenAI-compatible chat-completions client (standard library only)."""

    def __init__(self, settings: DraftSettings) -> None:
        self.settings = settings
        self.api_key = os.environ.get(settings.api_key_env, "")

    def complete(self, messages: list[dict[str, str]]) -> str:
        s = self.settings
        body = json.dumps({"model": s.model, "messages": messages, "temperature": s.temperature,
                           "max_tokens": s.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(s.base_url.rstrip("/") + "/chat/completions", data=body, headers=headers,
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=s.timeout_s) as resp:
                data = json.loads(resp.read().decode())
        except urllib.error.HTTPError as exc:
            raise OncoFMError(f"{s.base_url}: HTTP {exc.code} {exc.reason}; check the base URL, the model name and "
                              f"the key in ${s.api_key_env}") from None
        except (urllib.error.URLError, TimeoutError) as exc:
            raise OncoFMError(f"cannot reach {s.base_url} ({exc}); is the server running?") from None
        try:
            return str(data["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise OncoFMError(f"{s.base_url} did not answer in the chat-completions format: {str(data)[:200]}") from None


def draft_explanations(records: list[dict], settings: DraftSettings, client: ChatClient | None = None) -> list[dict]:
    """One draft per record with a label: ``{patient_id, evidence, draft}``."""
    client = client or ChatClient(settings)
    out = []
    for r in records:
        if r.get("label") is None:
            continue
        line = format_prediction(bool(r["label"]), float(r["risk"]))
        text = client.complete([
            {"role": "system", "content": DRAFT_SYSTEM},
            {"role": "user", "content": f"{evidence_prompt(r['evidence'])}\n\nEnd with this line:\n{line}"}])
        text = text.strip()
        if parse_prediction(text) is None:
            text = f"{text}\n{line}"
        out.append({"patient_id": r["patient_id"], "evidence": r["evidence"], "draft": text})
    return out


def export_for_review(drafts: list[dict], path: str | Path) -> Path:
    """CSV (``.csv``) or JSONL (otherwise) with empty ``corrected`` and ``approved`` columns."""
    path = Path(path)
    rows = [{"patient_id": d["patient_id"], "evidence": evidence_prompt(d["evidence"]), "draft": d["draft"],
             "corrected": "", "approved": ""} for d in drafts]
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["patient_id"])
                w.writeheader()
                w.writerows(rows)
        else:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _read_review(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".csv":
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def import_reviewed(run: str | Path, path: str | Path) -> int:
    """Put approved (corrected) drafts into ``reasoning/dataset.jsonl`` as targets; returns how many."""
    from oncofm.fusion.reasoning import DATASET_FILE, read_dataset
    from oncofm.paths import RunLayout

    path = Path(path)
    if not path.exists():
        raise OncoFMError(f"review file {path} does not exist")
    reviewed = {}
    for i, row in enumerate(_read_review(path)):
        if str(row.get("approved", "")).strip().lower() not in ("1", "yes", "y", "true", "x"):
            continue
        text = (row.get("corrected") or "").strip() or (row.get("draft") or "").strip()
        if parse_prediction(text) is None:
            raise OncoFMError(f"{path} row {i + 2} ({row.get('patient_id')}): the approved text has no prediction "
                              "line like 'Prediction: alive at 5 years (risk 0.21)'; fix it or clear 'approved'")
        reviewed[str(row["patient_id"])] = text
    records = read_dataset(run)
    n = 0
    for r in records:
        if r["patient_id"] in reviewed and r.get("label") is not None:
            r["target"], r["target_source"] = reviewed[r["patient_id"]], "expert"
            n += 1
    target = RunLayout(run).reasoning_dir / DATASET_FILE
    with atomic_path(target) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    log.info("imported %d reviewed targets into %s", n, target)
    return n
