"""course_utils: the package behind the "From Anchors to CLIP" notebooks.

Modules follow the course order:

========================  ===============================================================
``profiles``              every size knob, per profile (smoke / cpu / full)
``env``                   device, ``seed_everything``, the notebook banner
``boxes``                 01: IoU, anchor grid, labelling, sampling, box coding (Eq. 1)
``shapes``                01-03: the synthetic shapes world of seed 000 §4.1
``train``                 one training loop with checkpoints and exact resume
``registry``              data and weights registry (pooch, sha256, offline fallback)
``figures``               figure saving and drawing helpers
``checks``                exercise checks used by the notebooks (and the grader)
``nbbuild``               writes the student notebooks from ``solutions/``
========================  ===============================================================
"""

__version__ = "0.1.0"
