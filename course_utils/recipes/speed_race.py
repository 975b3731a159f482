"""The speed race of notebook 05 and ``benchmarks/retrieval.py``: SCAN vs the query-agnostic model.

Both models score every test image against every test caption.  SCAN (query-dependent) must run
its cross attention for each (image, caption) pair; the query-agnostic model encodes the gallery
and the captions once each and scores them with one matrix product.  The harness gives both the
same protocol -- the same inputs (:func:`_race_inputs`), one untimed warm-up each
(:func:`_warm_up`), rounds that time the two back to back (:func:`_race_round`), medians -- so a
change in the machine's load hits both alike:

* :func:`speed_table` -- end-to-end and scoring-only seconds and their ratios;
* :func:`speed_by_gallery_size` -- the end-to-end ratio as the gallery grows;
* :func:`query_agnostic_seconds` -- the query-agnostic model alone, for another caption tower.
"""

from __future__ import annotations

import time

import torch

from ..devices import module_device
from ..query_agnostic import QueryAgnostic, encode_gallery, encode_queries, score_all
from ..scan import SCAN, encode, scan_similarity
from .retrieval import RetrievalData, qa_inputs

__all__ = ["query_agnostic_seconds", "speed_by_gallery_size", "speed_table"]


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _sync(model: torch.nn.Module) -> None:
    """Wait for the model's GPU, if it is on one (a no-op on the CPU)."""
    if module_device(model).type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()


def _race_inputs(data: RetrievalData, cfg: dict, split: str, scan_level: str, qa_level: str,
                 n_images: int | None = None) -> dict:
    """What both models read: SCAN's regions and ``scan_level`` texts, the query-agnostic inputs and
    ``qa_level`` texts.  ``n_images`` above the split's size tiles its images (timing does not
    depend on what the features say, only on how many there are)."""
    feats = data.feats[split]
    n = len(feats["fine"]) if n_images is None else int(n_images)
    idx = torch.arange(n) % len(feats["fine"])
    gq, rq, kq = qa_inputs(feats, int(cfg["image_size"]), float(cfg["qa_alpha"]))
    return {"scan_feats": feats[scan_level][idx], "scan_text": data.texts[split][scan_level],
            "qa_image": (gq[idx], rq[idx], kq[idx]), "qa_text": data.texts[split][qa_level],
            "shard": tuple(cfg["eval_shard"])}


def _qa_end_to_end(qa_model: QueryAgnostic, x: dict) -> torch.Tensor:
    """Encode the gallery and the captions, score every pair: ``-> (I, C)``."""
    tok, ln = x["qa_text"]
    return score_all(encode_gallery(qa_model, *x["qa_image"]), encode_queries(qa_model, tok, ln))


@torch.no_grad()
def _race_round(scan_model: SCAN, qa_model: QueryAgnostic, x: dict) -> dict[str, float]:
    """One timed round: the query-agnostic model end to end, then SCAN, then the parts."""
    (tok_s, ln_s), (tok_q, ln_q) = x["scan_text"], x["qa_text"]
    t: dict[str, float] = {}

    def clock(key: str, fn):
        _sync(scan_model)
        t0 = time.perf_counter()
        out = fn()
        _sync(scan_model)  # CUDA kernels run asynchronously: wait for them before reading the clock
        t[key] = time.perf_counter() - t0
        return out

    clock("qa", lambda: _qa_end_to_end(qa_model, x))
    img, cap = clock("scan_encode", lambda: encode(scan_model, x["scan_feats"], tok_s, ln_s))
    clock("scan_scoring", lambda: scan_similarity(img, cap, ln_s, scan_model.cfg, x["shard"]))
    t["scan"] = t["scan_encode"] + t["scan_scoring"]
    gallery = clock("qa_gallery", lambda: encode_gallery(qa_model, *x["qa_image"]))
    queries = clock("qa_queries", lambda: encode_queries(qa_model, tok_q, ln_q))
    clock("qa_product", lambda: score_all(gallery, queries))
    return t


@torch.no_grad()
def _warm_up(scan_model: SCAN, qa_model: QueryAgnostic, x: dict) -> None:
    """First calls pay for allocations and the thread pool, for either model: pay them untimed."""
    tok_s, ln_s = x["scan_text"]
    _qa_end_to_end(qa_model, x)
    si, sc = x["shard"]
    img, cap = encode(scan_model, x["scan_feats"][:si], tok_s[:sc], ln_s[:sc])
    scan_similarity(img, cap, ln_s[:sc], scan_model.cfg, x["shard"])


def speed_table(scan_model: SCAN, qa_model: QueryAgnostic, data: RetrievalData, cfg: dict, split: str = "test",
                scan_level: str = "fine", qa_level: str = "fine", repeats: int = 3) -> dict:
    """Time every-image-against-every-caption retrieval on ``split`` for both models, in one run.

    Two comparisons, both measured here:

    * **end to end** (``scan_s`` vs ``query_agnostic_s``): encode the images, encode the captions,
      score every pair.  SCAN must run its cross attention for every (image, caption) pair; the
      query-agnostic model scores all queries with one matrix product.
    * **scoring only** (``scan_scoring_s`` vs ``qa_matrix_product_s``): both sides already encoded
      (the gallery offline, the captions once per query) -- the query-dependent part alone.

    Both models get the same protocol: one warm-up call each, then ``repeats`` rounds that time the
    query-agnostic model and SCAN one after the other (so a change in the machine's load hits
    both); every time reported is the median over the rounds.  ``ratio_rounds`` keeps
    each round's end-to-end ratio, so the spread is visible.  Returns seconds and both ratios
    (``ratio`` = end to end, ``scoring_ratio``).
    """
    x = _race_inputs(data, cfg, split, scan_level, qa_level)
    _warm_up(scan_model, qa_model, x)
    rounds = [_race_round(scan_model, qa_model, x) for _ in range(repeats)]
    med = {k: _median([r[k] for r in rounds]) for k in rounds[0]}
    out: dict = {"n_images": len(x["scan_feats"]), "n_captions": len(x["qa_text"][0]), "repeats": repeats,
                 "threads": torch.get_num_threads(),
                 "query_agnostic_s": med["qa"], "qa_gallery_encode_s": med["qa_gallery"],
                 "qa_query_encode_s": med["qa_queries"], "qa_matrix_product_s": med["qa_product"],
                 "scan_s": med["scan"], "scan_encode_s": med["scan_encode"],
                 "scan_scoring_s": med["scan_scoring"]}
    out["ratio"] = out["scan_s"] / out["query_agnostic_s"]
    out["scoring_ratio"] = out["scan_scoring_s"] / out["qa_matrix_product_s"]
    out["ratio_rounds"] = [r["scan"] / r["qa"] for r in rounds]
    return out


def speed_by_gallery_size(scan_model: SCAN, qa_model: QueryAgnostic, data: RetrievalData, cfg: dict,
                          sizes: tuple[int, ...] = (250, 500, 1000, 2000, 5000), split: str = "test",
                          scan_level: str = "fine", qa_level: str = "fine") -> list[dict]:
    """End-to-end seconds of both models against all of ``split``'s captions, for galleries of
    ``sizes`` images (one round each; sizes above the split tile its images).

    SCAN's cost grows with images x captions, the query-agnostic model's with images + captions,
    so their ratio grows with the gallery.  Returns one ``{"n_images", "scan_s", "query_agnostic_s",
    "ratio"}`` per size.
    """
    rows = []
    for n in sizes:
        x = _race_inputs(data, cfg, split, scan_level, qa_level, n_images=n)
        _warm_up(scan_model, qa_model, x)
        r = _race_round(scan_model, qa_model, x)
        rows.append({"n_images": n, "n_captions": len(x["qa_text"][0]), "scan_s": r["scan"],
                     "query_agnostic_s": r["qa"], "ratio": r["scan"] / r["qa"]})
    return rows


@torch.no_grad()
def query_agnostic_seconds(qa_model: QueryAgnostic, data: RetrievalData, cfg: dict, text_level: str, split: str = "test",
                           repeats: int = 3) -> float:
    """Median end-to-end seconds of the query-agnostic model alone (gallery + ``text_level`` captions +
    product) on ``split``, after one warm-up call: to set another caption tower beside
    :func:`speed_table`'s SCAN time."""
    x = _race_inputs(data, cfg, split, "fine", text_level)
    _qa_end_to_end(qa_model, x)
    times = []
    for _ in range(repeats):
        _sync(qa_model)
        t = time.perf_counter()
        _qa_end_to_end(qa_model, x)
        _sync(qa_model)
        times.append(time.perf_counter() - t)
    return _median(times)
