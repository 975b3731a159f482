"""The ``full`` run of each notebook, phase by phase, for :mod:`course_tools.footprint`.

Each ``estimate_NN(cfg)`` lists the heavy phases of notebook NN's ``full`` run with the full
profile's counts and measures their steps on the full architectures (random weights: the cost
does not depend on them).  Counts a phase does not have in the profile are stated where they are
used (SVT's word counts, captions per image measured on the course's generator).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from course_utils.profiles import Config, get_config

from .footprint import (
    GIB,
    T4_BANDWIDTH,
    T4_UTILISATION,
    Estimate,
    Phase,
    inference_phase,
    model_bytes,
    quadratic_probe,
    state_bytes,
    step_cost,
    timed,
    training_phase,
)

#: SVT (Wang, Babenko & Belongie 2011): tagged words in the 100 train / 249 test images.
SVT_WORDS = {"train": 257, "test": 647}
#: Downloads a notebook may make in ``full`` (bytes, from the registry entries' files).
DOWNLOADS = {"svt": 118e6, "sam_vit_b": 375e6, "clip_vit_b32_openai": 354e6, "mobilenet_v2": 14e6}


def _render_seconds(size: int, n: int = 20) -> float:
    """Seconds to render one shapes scene of ``size`` px on this CPU."""
    from course_utils.shapes import generate_scenes, render_scene

    scenes = generate_scenes(n, 0, size, 10, 20, max(4, size // 12), max(8, size // 6))
    return timed(lambda: [render_scene(s) for s in scenes]) / n


def _detection(cfg: Config, notebook: str, with_text: bool) -> Estimate:
    """Notebooks 02 (RPN) and 03 (detector): MobileNetV2 at 512 px, SGD, per-epoch validation."""
    from course_utils.detector import build_detector, detector_step
    from course_utils.rpn import build_rpn, rpn_step
    from course_utils.shapes import ShapesDataset, collate_scenes, generate_scenes

    s, section = cfg.shapes, (cfg.detector if with_text else cfg.rpn)
    model = build_detector(cfg) if with_text else build_rpn(cfg)
    step_fn = detector_step if with_text else rpn_step
    scenes = generate_scenes(2, 0, s.image_size, s.min_shapes, s.max_shapes, s.min_size, s.max_size)
    ds = ShapesDataset(scenes, n_extra_queries=int(s.extra_train_queries))

    def step(b: int) -> torch.Tensor:
        return step_fn(model, collate_scenes([ds[i % len(ds)] for i in range(b)]))["loss"]

    render = _render_seconds(s.image_size)
    workers = int(cfg.runtime.loader_workers)
    train = training_phase("train", model, step, 1, int(section.batch_size), s.n_train,
                           int(section.epochs), moments=1, host_s_per_example=render, workers=workers,
                           float16=bool(cfg.runtime.mixed_precision))
    val = Phase("validation each epoch", train.steps * s.n_val / s.n_train,
                train.flops_per_step / 3, 0.0, render * s.n_val * int(section.epochs) / max(1, workers))
    test = Phase("test", s.n_test / int(section.batch_size), train.flops_per_step / 3, 0.0, render * s.n_test)
    ckpt = model_bytes(model)
    return Estimate(notebook, [train, val, test], disk_bytes=ckpt * int(section.epochs) + ckpt
                    + (DOWNLOADS["mobilenet_v2"] if cfg.rpn.pretrained else 0))


def estimate_01(cfg: Config) -> Estimate:
    """Anchors and labelling: no training; 5000 scenes generated, a few rendered."""
    from course_utils.shapes import generate_scenes

    s = cfg.shapes
    n = s.n_train + s.n_val + s.n_test
    t = timed(lambda: generate_scenes(50, 0, s.image_size, s.min_shapes, s.max_shapes, s.min_size, s.max_size), 1)
    return Estimate("01", [Phase("scene generation (host)", 1, 0.0, 0.0, t / 50 * n)])


def estimate_02(cfg: Config) -> Estimate:
    return _detection(cfg, "02", with_text=False)


def estimate_03(cfg: Config) -> Estimate:
    return _detection(cfg, "03", with_text=True)


def _retrieval_data(cfg: Config) -> dict:
    """Captions per image and tokens per caption, measured on a few full-size scenes."""
    from course_utils.captions import CaptionVocabulary, build_captioned

    r = dict(cfg.retrieval)
    r.update(n_train=40, n_val=1, n_test=1)
    split = build_captioned(r, seed=0)["train"]
    vocab = CaptionVocabulary()
    mean_len = {level: float(vocab.batch(texts)[1].float().mean())
                for level, texts in (("fine", split.phrase_texts), ("coarse", split.texts))}
    return {"caps_per_image": len(split.texts) / len(split), "vocab": vocab, "split": split,
            "phrases_per_image": len(split.phrase_texts) / len(split), "mean_len": mean_len}


def _tokens(data: dict, level: str, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``b`` captions of the level's mean length: probes at two batch sizes then differ in size only."""
    n = max(1, round(data["mean_len"][level]))
    return torch.randint(1, len(data["vocab"]), (b, n)), torch.full((b,), n)


def _scan_phases(cfg: Config, data: dict, rows: list[tuple[str, str]], tag: str) -> list[Phase]:
    """Train and evaluate SCAN variants ``rows`` = [(level, direction)] at full sizes."""
    from course_utils.recipes.retrieval import variant_config
    from course_utils.scan import SCAN, scan_scores, scan_step_fn

    r = cfg.retrieval
    feat = int(r.backbone_channels) * int(r.feat_pool) ** 2
    vocab = data["vocab"]
    phases = []
    for level, direction in rows:
        k = int(r.k_fine) if level == "fine" else 1
        per_image = data["phrases_per_image"] if level == "fine" else data["caps_per_image"]
        model = SCAN(feat, len(vocab), int(r.word_dim), int(r.embed_dim), variant_config(direction, "avg", r))
        step = scan_step_fn(float(r.margin))

        def cost(b: int, model=model, step=step, k=k, level=level) -> tuple[float, float]:
            batch = (torch.randn(b, k, feat), *_tokens(data, level, b), torch.arange(b))
            return step_cost(model, lambda: step(model, batch)["loss"], train=True)

        bs = int(r.batch_size)
        flops, saved = quadratic_probe(cost, 4, 8, bs)
        n_caps = r.n_train * per_image
        phases.append(Phase(f"{tag}: train SCAN {level} {direction}", math.ceil(n_caps / bs) * int(r.epochs),
                            flops, state_bytes(model, 2) + saved))
        # evaluation: every test image against every test caption, in shards
        img = torch.randn(8, k, int(r.embed_dim))
        _, lengths = _tokens(data, level, 16)
        cap = torch.randn(16, int(lengths.max()), int(r.embed_dim))
        with torch.no_grad():
            f_pairs, _ = step_cost(model, lambda m=model, i=img, c=cap, n=lengths: scan_scores(i, c, n, m.cfg),
                                   train=False)
        pairs = r.n_test * r.n_test * per_image
        phases.append(Phase(f"{tag}: evaluate SCAN {level} {direction}", pairs / (8 * 16), f_pairs,
                            state_bytes(model, 0)))
    return phases


def _backbone_phases(cfg: Config, data: dict) -> list[Phase]:
    from course_utils.scan import Backbone

    r = cfg.retrieval
    net = Backbone(int(r.backbone_channels))
    size = int(r.image_size)
    render = timed(lambda: [data["split"].image(i) for i in range(10)]) / 10
    n_all = r.n_train + r.n_val + r.n_test
    train = training_phase("train the region backbone", net, lambda b: net(torch.rand(b, 3, size, size)).mean(),
                           2, 64, r.n_train, int(r.backbone_epochs), moments=2, host_s_per_example=render)
    feats = inference_phase("pool region features", net, lambda b: net(torch.rand(b, 3, size, size)), 2, n_all,
                            host_s_per_example=render, batch=128)
    return [train, feats]


def estimate_04(cfg: Config) -> Estimate:
    from course_utils.matchmap import MatchmapModel, contrastive_matchmap_loss
    from course_utils.recipes.retrieval import TABLE_4_1
    from course_utils.scan import Backbone

    r, data = cfg.retrieval, _retrieval_data(cfg)
    rows = [(level, d) for level in ("coarse", "fine") for _, d, _, _ in TABLE_4_1]
    phases = _backbone_phases(cfg, data) + _scan_phases(cfg, data, rows, "Table 4.1")
    mm = MatchmapModel(Backbone(int(r.backbone_channels)), len(data["vocab"]), int(r.word_dim), int(r.embed_dim))
    size = int(r.image_size)

    def cost(b: int) -> tuple[float, float]:
        tokens, lengths = _tokens(data, "coarse", b)

        def step() -> torch.Tensor:
            cells = mm.cells(torch.rand(b, 3, size, size))
            words = mm.words(tokens, lengths)
            return contrastive_matchmap_loss(cells, words, lengths, "misa", float(r.mm_temperature))
        return step_cost(mm, step, train=True)

    flops, saved = quadratic_probe(cost, 2, 4, int(r.mm_batch_size))
    phases.append(Phase("train matchmaps", math.ceil(r.n_train / int(r.mm_batch_size)) * int(r.mm_epochs), flops,
                        state_bytes(mm, 2) + saved))
    n_feat = (r.n_train + r.n_val + r.n_test) * int(r.k_fine) * int(r.backbone_channels) * int(r.feat_pool) ** 2 * 4
    ckpts = sum(1 for p in phases if p.name.startswith("Table 4.1: train")) * int(r.epochs) * 30e6
    return Estimate("04", phases, disk_bytes=n_feat + ckpts, host_bytes=2 * n_feat)


def estimate_05(cfg: Config) -> Estimate:
    """Query-agnostic training (two text levels), SCAN's five fine rows again (a fresh Colab VM has
    no cache of notebook 04), the speed race up to the largest gallery."""
    from course_utils.query_agnostic import QueryAgnostic, contrastive_loss
    from course_utils.recipes.retrieval import TABLE_4_1

    r, data = cfg.retrieval, _retrieval_data(cfg)
    phases = _backbone_phases(cfg, data)
    phases += _scan_phases(cfg, data, [("fine", d) for _, d, _, _ in TABLE_4_1], "SCAN rows")
    vocab = data["vocab"]
    feat = int(r.backbone_channels) * int(r.feat_pool) ** 2
    qa = QueryAgnostic(feat, len(vocab), int(r.word_dim), int(r.embed_dim), int(r.qa_heads),
                       text_tower=str(r.qa_text_tower))
    for level in ("fine", "coarse"):
        k = int(r.k_fine)

        def cost(b: int, k=k, level=level) -> tuple[float, float]:
            tokens, lengths = _tokens(data, level, b)

            def step() -> torch.Tensor:
                img = qa.encode_image(torch.randn(b, feat), torch.randn(b, k, feat), torch.ones(b, k, dtype=torch.bool))
                return contrastive_loss(img, qa.encode_text(tokens, lengths), qa.temperature, torch.arange(b))
            return step_cost(qa, step, train=True)

        per_image = data["phrases_per_image"] if level == "fine" else data["caps_per_image"]
        flops, saved = quadratic_probe(cost, 4, 8, int(r.batch_size))
        phases.append(Phase(f"train query-agnostic ({level})", math.ceil(r.n_train * per_image / int(r.batch_size))
                            * int(r.qa_epochs), flops, state_bytes(qa, 2) + saved))
    # section 4.1's ablation: without a saved table the notebook trains qa_ablation_live rows.
    # Each row is costed as the base model's step (fine or coarse) times its epochs, and times the
    # square of the embedding ratio or the block count where those change (the linear layers dominate).
    from course_utils.recipes.qa_ablation import qa_ablation_rows

    base = {p.name: p for p in phases if p.name.startswith("train query-agnostic")}
    live_rows = qa_ablation_rows(dict(r))[1:1 + int(r.qa_ablation_live)]
    steps, flops = 0.0, 0.0
    for row in live_rows:
        level = "coarse" if row["text_level"] == "coarse" else "fine"
        if row["text_level"] == "coarse" and not row["knobs"]:
            continue  # section 4's whole-caption model, already costed above
        b = base[f"train query-agnostic ({level})"]
        k = row["knobs"]
        scale = (k.get("embed_dim", r.embed_dim) / r.embed_dim) ** 2 * k.get("qa_layers", 1)
        n = b.steps * k.get("qa_epochs", r.qa_epochs) / int(r.qa_epochs)
        steps += n
        flops += n * b.flops_per_step * scale
    if steps:
        fine = base["train query-agnostic (fine)"]
        phases.append(Phase("query-agnostic ablation rows (section 4.1)", math.ceil(steps), flops / steps,
                            fine.gpu_bytes * 4))
    # speed race: SCAN scores every (image, caption) pair of each gallery size, three rounds at 1000
    scan_eval = next(p for p in phases if p.name.startswith("SCAN rows: evaluate"))
    per_pair = scan_eval.flops_per_step * scan_eval.steps / (r.n_test * r.n_test * data["phrases_per_image"])
    pairs = (3 * r.n_test + sum(r.speed_gallery_sizes)) * r.n_test * data["phrases_per_image"]
    phases.append(Phase("speed race (SCAN side)", 1, per_pair * pairs, scan_eval.gpu_bytes))
    return Estimate("05", phases,
                    disk_bytes=5 * int(r.epochs) * 30e6 + (2 + len(live_rows)) * int(r.qa_epochs) * 60e6)


def _vit() -> torch.nn.Module:
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained=None)
    return model


def _vit_train_phase(cfg: Config, model: torch.nn.Module, name: str) -> Phase:
    from course_utils.clip.finetune import contrastive_step

    sv = cfg.svt

    def cost(b: int) -> tuple[float, float]:
        batch = (torch.rand(b, 3, 224, 224), torch.randint(1, 400, (b, 77)))
        return step_cost(model, lambda: contrastive_step(model, batch)["loss"], train=True)

    flops, saved = quadratic_probe(cost, 2, 4, int(sv.ft_batch_size))
    steps = math.ceil(SVT_WORDS["train"] / int(sv.ft_batch_size)) * int(sv.ft_epochs)
    return Phase(name, steps, flops, state_bytes(model, 2) + saved, host_s=0.01 * SVT_WORDS["train"] * int(sv.ft_epochs))


def _vit_eval_phase(cfg: Config, model: torch.nn.Module, name: str, times: int = 1) -> Phase:
    sv = cfg.svt

    def step(b: int) -> None:
        model.encode_image(torch.rand(b, 3, 224, 224))
        model.encode_text(torch.randint(1, 400, (b * int(sv.lexicon_size), 77)))

    p = inference_phase(name, model, step, 1, sv.n_test * times, host_s_per_example=0.01)
    # one layer's activations of the text tower at a batch of eval_batch_size words (77 tokens,
    # the 2048-wide MLP, a few tensors alive at once); a no-grad forward frees the others
    p.gpu_bytes += int(sv.eval_batch_size) * 77 * 2048 * 4 * 4
    return p


def estimate_06(cfg: Config) -> Estimate:
    model = _vit()
    return Estimate("06", [_vit_eval_phase(cfg, model, "zero-shot word spotting on SVT test")],
                      disk_bytes=DOWNLOADS["svt"] * 2.2 + DOWNLOADS["clip_vit_b32_openai"])


def estimate_07(cfg: Config) -> Estimate:
    model = _vit()
    sv = cfg.svt
    kept = len([e for e in sv.ft_checkpoints if e <= sv.ft_epochs])
    phases = [_vit_train_phase(cfg, model, "fine-tune ViT-B/32 (Algorithm 1)"),
              _vit_eval_phase(cfg, model, "evaluate every kept checkpoint", times=kept + 1)]
    size = model_bytes(model)
    return Estimate("07", phases, disk_bytes=kept * size + 2 * size + DOWNLOADS["svt"] * 2.2
                    + DOWNLOADS["clip_vit_b32_openai"])


def _sam_phases(cfg: Config) -> list[Phase]:
    """SAM ViT-B with Table 3.2's generator on every SVT train and test image."""
    from segment_anything import sam_model_registry

    from course_utils.clip.masks import TABLE_3_2

    with torch.device("meta"):
        sam = sam_model_registry["vit_b"]()
    flops_enc, _ = step_cost(sam, lambda: sam.image_encoder(torch.empty(1, 3, 1024, 1024, device="meta")),
                             train=False)
    n_images = cfg.svt.n_train + cfg.svt.n_test
    weights = sum(p.numel() * 4 for p in sam.parameters())
    enc = Phase("SAM ViT-B image encoder (1024 px)", n_images, flops_enc, weights + 2 * GIB)
    # The generator: 1024 points in batches of points_per_batch through the prompt encoder and
    # mask decoder (FLOPs counted on a real decoder), then every point's 3 masks upsampled to
    # 1024 px and to the image, thresholded and scored: memory-bound, so costed by bytes at
    # T4_BANDWIDTH x T4_UTILISATION (six passes over each float mask, assumed).
    decoder = sam_model_registry["vit_b"]().requires_grad_(False)  # inference only
    emb = torch.randn(1, 256, 64, 64)
    n_batch = int(TABLE_3_2.get("points_per_batch", 64))
    points = int(TABLE_3_2["points_per_side"]) ** 2

    def decode() -> None:
        pts = torch.rand(n_batch, 1, 2) * 1024
        sparse, dense = decoder.prompt_encoder(points=(pts, torch.ones(n_batch, 1, dtype=torch.int64)),
                                               boxes=None, masks=None)
        decoder.mask_decoder(image_embeddings=emb, image_pe=decoder.prompt_encoder.get_dense_pe(),
                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)

    flops_dec, _ = step_cost(decoder, decode, train=False)
    h, w = cfg.svt.image_size[1], cfg.svt.image_size[0]
    mask_bytes = points * 3 * (1024 * 1024 + h * w) * 4 * 6
    gen = Phase("SAM generator: 1024-point decoder + mask post-processing", n_images * points / n_batch,
                flops_dec, weights + 3 * n_batch * 1024 * 1024 * 4 * 2,
                host_s=n_images * mask_bytes / (T4_BANDWIDTH * T4_UTILISATION))
    return [enc, gen]


def estimate_08(cfg: Config) -> Estimate:
    model = _vit()
    phases = _sam_phases(cfg)
    od = cfg.odits
    crops = (cfg.svt.n_train + cfg.svt.n_test) * int(od.max_objects)
    phases.append(inference_phase("CLIP embeddings of every object", model,
                                  lambda b: model.encode_image(torch.rand(b, 3, 224, 224)), 2, crops, 0.002, batch=64))
    if od.finetune_clip_if_missing:  # a fresh Colab VM has no checkpoint of notebook 07
        phases.append(_vit_train_phase(cfg, model, "fine-tune CLIP as notebook 07 (no checkpoint on a fresh VM)"))
    size = model_bytes(model)
    kept = len([e for e in cfg.svt.ft_checkpoints if e <= cfg.svt.ft_epochs])
    # notebook 07's kept checkpoints and its chosen weights, then the latest checkpoint of ODITS and
    # of its ablation (each holds the frozen CLIP too)
    return Estimate("08", phases, disk_bytes=DOWNLOADS["sam_vit_b"] + DOWNLOADS["clip_vit_b32_openai"]
                    + DOWNLOADS["svt"] * 2.2 + (kept + 2) * size + 2 * size)


ESTIMATORS: dict[str, Callable[[Config], Estimate]] = {
    "01": estimate_01, "02": estimate_02, "03": estimate_03, "04": estimate_04,
    "05": estimate_05, "06": estimate_06, "07": estimate_07, "08": estimate_08,
}


def estimate(notebook: str, cfg: Config | None = None) -> dict:
    """The estimated ``full`` footprint of notebook ``"NN"`` as a dict (see ``Estimate.summary``)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ESTIMATORS[notebook](cfg or get_config("full")).summary()
