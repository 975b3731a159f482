"""Pretrain the course's small CLIP on rendered words and write ``data/small_clip/``.

Usage (the command that built the shipped weights is in ``data/small_clip/manifest.json``)::

    python tools/pretrain_small_clip.py                      # full run, writes data/small_clip/
    python tools/pretrain_small_clip.py --steps 20 --out /tmp/sc --eval-images 20   # quick check

What it does:

1. draws batches from :class:`course_utils.synthsvt.WordStream` in its ``frontal`` domain (signs
   seen head-on in even light, nothing in front of them; SynthSVT's street scenes add
   perspective, grain, uneven light and occluders, the domain gap of notebook 07): half of each batch are words
   (the street-sign vocabulary, Zipf-weighted, mixed with random letter strings), the other half
   one- or two-letter edits of those same words, so every batch holds look-alike pairs (JOINT /
   JOINE) and the contrastive loss can only be lowered by reading letters;
2. trains :func:`course_utils.clip.small.build_small_clip` with the symmetric loss of Algorithm 1
   (AdamW for the dense weights, SparseAdam for the token table, warm-up + cosine schedule);
3. saves ``small_clip.safetensors`` and ``manifest.json``: sha256, the exact command, seeds,
   steps, wall time, the final lexicon-50 top-1 accuracy on the SynthSVT test split, and how many
   SynthSVT test words (tags and lexicon words) occurred in the pretraining stream.

Determinism: batch ``s`` depends only on ``(seed, s)``; torch runs with a fixed number of threads
and deterministic algorithms, and MKL/oneDNN/ATen are pinned to AVX2 code paths, so the same
command writes the same bytes on any x86-64 CPU with AVX2.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tools"), str(REPO)]

import _shared  # noqa: E402

_shared.pin_numerics()  # before torch loads MKL/oneDNN

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import string  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from course_utils import synthsvt as ss  # noqa: E402
from course_utils.clip import finetune, loading, small, wordspotting  # noqa: E402
from course_utils.env import seed_everything  # noqa: E402

# --------------------------------------------------------------------------------------------
# the stream of training batches
# --------------------------------------------------------------------------------------------


class PairBatches(torch.utils.data.Dataset):
    """Batch ``s`` of the pretraining stream: ``(images (B,3,32,128), tokens (B,16), texts)``.

    ``B/2`` distinct base texts are drawn; each is followed by a look-alike edit of itself, and
    all ``B`` texts are distinct (a repeated text would make two "correct" pairs in one row of
    the similarity matrix).
    """

    def __init__(self, seed: int, batch_size: int, random_rate: float, domain: str = "frontal") -> None:
        self.seed = seed
        self.batch_size = batch_size
        self.random_rate = random_rate
        self.words = list(ss.STREET_WORDS)
        # half Zipf, half uniform: frequent words often, every word regularly
        self.p = 0.5 * ss.zipf_weights(len(self.words)) + 0.5 / len(self.words)
        self.stream = ss.WordStream(self.words, seed=seed, domain=domain)
        self.tokenizer = small.small_clip_tokenizer()

    def __len__(self) -> int:  # the stream is endless; the sampler decides how far we read
        return 1 << 40

    def _base_text(self, rng: np.random.Generator) -> str:
        if rng.random() < self.random_rate:
            n = int(rng.integers(2, 11))
            return "".join(string.ascii_uppercase[int(k)] for k in rng.integers(0, 26, size=n))
        return self.words[int(rng.choice(len(self.words), p=self.p))]

    def texts(self, step: int) -> list[str]:
        """The ``B`` texts of batch ``step`` (no rendering: used to count test-word overlap)."""
        rng = np.random.default_rng([self.seed, step, 1])
        texts: list[str] = []
        seen: set[str] = set()
        while len(texts) < self.batch_size:
            base = self._base_text(rng)
            if base in seen:
                continue
            twin = ss.lookalikes(base, 1, rng, vocabulary=(), exclude=seen | {base})
            if not twin:
                continue
            texts += [base, twin[0]]
            seen.update((base, twin[0]))
        return texts

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        texts = self.texts(step)
        images = [self.stream.render(t, np.random.default_rng([self.seed, step, 2, k]))
                  for k, t in enumerate(texts)]
        x = torch.stack([small.small_clip_preprocess(im) for im in images])
        return x, self.tokenizer(texts), texts


def _collate(item):  # the dataset already returns whole batches
    return item


# --------------------------------------------------------------------------------------------
# evaluation on SynthSVT test
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: torch.nn.Module, split) -> dict[str, float]:
    """Lexicon-50 top-1 word-spotting accuracy of ``model`` on the word crops of ``split``."""
    model.eval()
    bundle = loading.ClipBundle(model, small.small_clip_preprocess, small.small_clip_tokenizer(), "small", "training")
    crops = split.word_crops()
    vocab = sorted({w for im in split for w in im.lexicon})
    img = bundle.encode_images([c for c, _, _ in crops], batch_size=128)
    txt = bundle.encode_texts(vocab)
    acc = wordspotting.lexicon_top1_accuracy(img, txt, vocab, [r.lexicon for _, _, r in crops], [t for _, t, _ in crops])
    model.train()
    return {"lexicon50_top1_synthsvt_test": acc, "n_crops": len(crops)}


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--random-rate", type=float, default=0.25,
                    help="share of base texts that are random letter strings")
    ap.add_argument("--domain", choices=ss.WORD_DOMAINS, default="frontal",
                    help="how the words are rendered (course_utils.synthsvt.WordStream): signs seen head-on "
                         "in even light (the default, a different domain from SynthSVT's street signs) "
                         "or SynthSVT's own street renderer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (fixed: results depend on it; one thread also avoids OpenMP spin-waits on a busy machine)")
    ap.add_argument("--workers", type=int, default=1, help="rendering processes (do not change results)")
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--eval-images", type=int, default=249)
    ap.add_argument("--out", type=Path, default=REPO / "data" / "small_clip")
    ap.add_argument("--ckpt", type=Path, default=Path(tempfile.gettempdir()) / "small_clip_pretrain.pt",
                    help="resumable state, written at every evaluation (resuming gives the same bytes)")
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from the weights of an earlier run (a second, longer stage); its "
                         "sha256 and command go into the manifest")
    args = ap.parse_args(argv)
    command = "python tools/pretrain_small_clip.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    model = small.build_small_clip(seed=args.seed)
    init_info = None
    if args.init is not None:
        model.load_state_dict(small.load_small_clip_state(args.init))
        init_manifest = args.init.parent / "manifest.json"
        init_info = {"file": str(args.init), "sha256": small.file_sha256(args.init),
                     "manifest": json.loads(init_manifest.read_text()) if init_manifest.is_file() else None}
        if init_info["manifest"]:
            init_info["manifest"].pop("loss_log", None)
        print(f"starting from {args.init} (sha256 {init_info['sha256'][:12]}…)", flush=True)
    model.token_embedding.sparse = True  # sparse gradients: only the rows in the batch move
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n != "token_embedding.weight"]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    opt_tok = torch.optim.SparseAdam([model.token_embedding.weight], lr=args.lr, betas=(0.9, 0.98), eps=1e-6)

    start, log, done_time = 0, [], 0.0
    run_key = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "warmup", "weight_decay",
                                             "random_rate", "seed", "threads", "domain")}
    run_key["init"] = init_info["sha256"] if init_info else None
    if not args.no_resume and args.ckpt.is_file():
        state = torch.load(args.ckpt, weights_only=True)
        if state["run_key"] == json.dumps(run_key, sort_keys=True):
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            opt_tok.load_state_dict(state["opt_tok"])
            start, log, done_time = state["step"], json.loads(state["log"]), state["time"]
            print(f"resuming from {args.ckpt} at step {start}", flush=True)

    data = PairBatches(args.seed, args.batch_size, args.random_rate, args.domain)
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(start, args.steps), num_workers=args.workers,
                                         collate_fn=_collate, prefetch_factor=4 if args.workers else None,
                                         persistent_workers=False)
    split = _shared.synthsvt_test(args.eval_images)
    print(f"pretraining small CLIP: {args.steps} steps x {args.batch_size}, lr {args.lr}, seed {args.seed}, "
          f"{args.threads} threads; eval on {len(split)} SynthSVT test images", flush=True)

    t0 = time.time() - done_time
    running = 0.0
    model.train()
    for step, (x, tokens, _texts) in enumerate(loader, start=start):
        for group in opt.param_groups + opt_tok.param_groups:
            group["lr"] = _shared.lr_at(step, args.steps, args.warmup, args.lr)
        out = finetune.clip_contrastive_loss(model.encode_image(x), model.encode_text(tokens), model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        opt_tok.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        opt_tok.step()
        with torch.no_grad():  # CLIP's cap on 1/τ: keeps the softmax from saturating
            model.logit_scale.clamp_(0, math.log(100))
        running += out["loss"].item()
        if (step + 1) % 50 == 0:
            print(f"step {step + 1:5d}  loss {running / 50:.3f}  1/tau {model.logit_scale.exp().item():.1f}  "
                  f"{time.time() - t0:.0f}s", flush=True)
            log.append({"step": step + 1, "loss": running / 50})
            running = 0.0
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            m = evaluate(model, split)
            print(f"step {step + 1:5d}  lexicon-50 top-1 {m['lexicon50_top1_synthsvt_test']:.3f}", flush=True)
            log.append({"step": step + 1, **m})
            torch.save({"run_key": json.dumps(run_key, sort_keys=True), "model": model.state_dict(),
                        "opt": opt.state_dict(), "opt_tok": opt_tok.state_dict(), "step": step + 1,
                        "log": json.dumps(log), "time": time.time() - t0}, args.ckpt)
    train_time = time.time() - t0

    model.token_embedding.sparse = False
    model.eval()
    sha = small.save_small_clip(model, args.out / small.SMALL_CLIP_WEIGHTS)
    # evaluate the weights as saved (what users load), not the in-memory model
    reloaded = small.build_small_clip(zero_token_embedding=False)
    reloaded.load_state_dict(small.load_small_clip_state(args.out / small.SMALL_CLIP_WEIGHTS))
    final = evaluate(reloaded, split)
    print(f"final lexicon-50 top-1 on SynthSVT test: {final['lexicon50_top1_synthsvt_test']:.3f} "
          f"({final['n_crops']} crops), sha256 {sha}", flush=True)

    # honest "zero-shot": which SynthSVT test words did the stream show the model?
    seen: set[str] = set()
    for s in range(args.steps):
        seen.update(data.texts(s))
    earlier = init_info["manifest"] if init_info else None
    if earlier:  # an earlier stage's stream counts too
        prev = PairBatches(earlier["seed"], earlier["batch_size"], earlier["hyperparameters"]["random_rate"],
                           # manifests older than the domain knob: that stream is today's "frontal"
                           earlier["hyperparameters"].get("domain", "frontal"))
        for s in range(earlier["steps"]):
            seen.update(prev.texts(s))
    tags = {w.tag for im in split for w in im.words}
    lex = {w for im in split for w in im.lexicon}
    manifest = {
        "model": "open_clip.CLIP(**course_utils.clip.small.SMALL_CLIP_CONFIG)",
        "config": json.loads(json.dumps(small.SMALL_CLIP_CONFIG)),
        "tokenizer": "course_utils.clip.small.small_clip_tokenizer(): open_clip.get_tokenizer('ViT-B-32', context_length=16) "
                     "(OpenAI BPE) on the spelled-out word (spell_out: 'JOINT' -> 'J O I N T', one token per letter)",
        "file": small.SMALL_CLIP_WEIGHTS,
        "sha256": sha,
        "bytes": (args.out / small.SMALL_CLIP_WEIGHTS).stat().st_size,
        "command": command,
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "samples_seen": args.steps * args.batch_size,
        "hyperparameters": {k: getattr(args, k) for k in ("lr", "warmup", "weight_decay", "random_rate", "threads",
                                                          "domain")},
        "wall_time_s": round(train_time, 1),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "final_metrics": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in final.items()},
        "eval_split": f"SynthSVT test of the cpu profile (seed {_shared.EVAL_SEED}), {len(split)} images",
        "pretraining_overlap": {
            "distinct_texts_in_stream": len(seen),
            "test_tags_in_stream": len(tags & seen),
            "test_tags_total": len(tags),
            "test_lexicon_words_in_stream": len(lex & seen),
            "test_lexicon_words_total": len(lex),
            "note": f"the stream draws from the same street-sign vocabulary as SynthSVT, so every test "
                    f"word was seen as a rendered crop in pretraining, but rendered in the {args.domain!r} "
                    "domain of WordStream; the test images, their layouts and their street rendering "
                    "were not seen, nor were the lexicon words counted as missing above (look-alike "
                    "distractors the model reads for the first time at test)",
        },
        "init": init_info,
        "loss_log": log,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


if __name__ == "__main__":
    main()
