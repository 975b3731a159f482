"""CLIP for word spotting and ODITS (notebooks 06-08, seed 004), one idea per module.

* :mod:`~course_utils.clip.small` — the course's small CLIP (config, letter tokenizer, weight files);
* :mod:`~course_utils.clip.loading` — :func:`~course_utils.clip.loading.load_clip`, the one factory
  for every CLIP (ViT-B/32, the small one, a random one);
* :mod:`~course_utils.clip.data` — the SVT splits: real SVT when it can be had, else SynthSVT;
* :mod:`~course_utils.clip.wordspotting` — the word–image probability matrix, both metric
  approaches, the entropy and the one Table 2.6 evaluator;
* :mod:`~course_utils.clip.evaluation` — a CLIP on an SVT split (rows, vocabulary, Table 2.6);
* :mod:`~course_utils.clip.finetune` — contrastive fine-tuning (Algorithm 1, Table 2.5);
* :mod:`~course_utils.clip.masks` — object masks (SAM, a tiny SAM, boxes);
* :mod:`~course_utils.clip.objects` — masks → objects → CLIP features, object counts;
* :mod:`~course_utils.clip.odits` — the ODITS model.

The recipes that string them together for notebooks 07-08 and their benchmarks are
:mod:`course_utils.recipes.clip_finetune` and :mod:`course_utils.recipes.odits`.
"""
