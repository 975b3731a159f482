"""course_utils: the package behind the "From Anchors to CLIP" notebooks.

Modules follow the course order:

========================  ===============================================================
``profiles``              every size knob, per profile (smoke / cpu / full)
``env``                   device, ``seed_everything``, the notebook banner
``boxes``                 01: IoU, anchor grid, labelling, sampling, box coding (Eq. 1)
``shapes``                01-03: the synthetic shapes world of seed 000 §4.1
``rpn``                   02: backbones, RPN head, loss (Eq. 2), proposal decoding + NMS
``detector``              03: proposal encoder, text encoder, alignment (Eq. 3-5), end-to-end model
``detection_metrics``     03: Table 1 evaluation (§4.4)
``captions``              04-05: captioned shapes scenes, Karpathy-layout feature loader
``scan``                  04: SCAN stacked cross attention, hardest-negative loss, R@K
``matchmap``              04: word x conv-cell matchmaps (seed 002)
``qaret``                 05: query-agnostic retrieval with an object-prior decoder (seed 001)
``svt`` / ``synthsvt``    06: Street View Text loader and its synthetic twin
``clip_svt``              06: CLIP loading (ViT-B/32 or the course's small CLIP), word-spotting metrics
``svt_finetune``          07: contrastive fine-tuning (Algorithm 1), Table 2.6
``masks`` / ``odits``     08: object masks (SAM or boxes) and the ODITS model
``train``                 one training loop with checkpoints and exact resume
``registry``              data and weights registry (pooch, sha256, offline fallback)
``figures``               figure saving and drawing helpers
``checks``                exercise checks used by the notebooks (and the grader)
``nbbuild``               writes the student notebooks from ``solutions/``
``nbrun`` / ``grade``     execute notebooks with time limits; grade a folder of submissions
``report``                benchmark results JSON and the README results table
========================  ===============================================================
"""

__version__ = "0.1.0"
