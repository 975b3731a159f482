"""course_utils: the package behind the "From Anchors to CLIP" notebooks.

Modules by layer, and within a layer in the course's order (notebook numbers on the left):

=============================  ==============================================================
**plumbing**
``profiles``                   every size knob, per profile (smoke / cpu / full)
``env``                        device, ``seed_everything``, the notebook banner
``cache``                      the one cache root and the one run-folder naming (``run_dir``)
``registry``                   downloads with sha256, and the one offline decision
``figures``                    figure saving and drawing helpers
**data**
``shapes``                     01-03: the synthetic shapes world of seed 000 §4.1
``captions``                   04-05: captioned shapes scenes, Karpathy-layout feature loader
``svt`` / ``synthsvt``         06-08: Street View Text loader and its synthetic twin
``signs``                      06-08: street signs rendered head-on or weathered (SynthSVT, pretraining)
``clip.data``                  06-08: real SVT when it can be had, else SynthSVT
**models** (and their losses)
``boxes``                      01: IoU, anchor grid, labelling, sampling, box coding (Eq. 1)
``rpn``                        02: backbones, RPN head, loss (Eq. 2), proposal decoding + NMS
``detector``                   03: proposal encoder, query encoder, alignment (Eq. 3-5)
``scan``                       04: SCAN stacked cross attention, hardest-negative loss, R@K
``matchmap``                   04: word x conv-cell matchmaps (seed 002)
``query_agnostic``             05: query-agnostic retrieval with an object-prior decoder (seed 001)
``clip.small``                 06-08: the course's small CLIP (config, tokenizer, weight files)
``clip.loading``               06-08: ``load_clip``, the one factory for every CLIP
``clip.masks``                 08: object masks (SAM, tiny SAM, boxes)
``clip.objects``               08: masks -> objects -> CLIP features; counts, Anderson-Darling
``clip.odits``                 08: the ODITS model
**metrics**
``detection_metrics``          03: Table 1 evaluation (§4.4), proposal recall
``clip.wordspotting``          06-08: the probability matrix and the one Table 2.6 evaluator
``clip.evaluation``            06-07: a CLIP on an SVT split (rows, vocabulary, Table 2.6)
**training**
``history`` / ``checkpoints``  a run's record; checkpoint files with exact resume
``resources`` / ``tracking``   per-step CPU, GPU and memory use; TensorBoard log, weights sha256
``distributed`` / ``loaders``  torchrun: ranks, global-batch losses; an epoch's batches per rank
``train``                      ``fit``: the one training loop (one process or several)
``clip.finetune``              07: contrastive fine-tuning (Algorithm 1, Table 2.5)
``cli``                        every training recipe from the command line (``torchrun`` too)
**pipelines**
``recipes.detection``          01-03: labelling reference, optimiser, run knobs, detector training
``recipes.retrieval``          04-05: region features, the Table 4.1 grid, query-agnostic model
``recipes.retrieval_data``     04-05: real Flickr30K / MSCOCO inputs when cached, else the scenes
``recipes.speed_race``         05: query-agnostic vs query-dependent timing
``recipes.clip_finetune``      07: fine-tune, keep the checkpoint chosen by precision, the ablation
``recipes.odits``              08: ODITS trained and compared with its CLIP
**course**
``checks``                     exercise checks used by the notebooks (and read by the grader)
=============================  ==============================================================

Instructor and maintainer tooling (notebook build, runner, grader, results report) is the
separate package ``course_tools``, installed with the ``dev`` extra.
"""

__version__ = "0.1.0"
