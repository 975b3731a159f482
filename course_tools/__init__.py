"""course_tools: instructor and maintainer tooling for the course, apart from the student package.

========================  ===============================================================
``nbbuild``               builds the student notebooks in ``notebooks/`` from ``solutions/``
``nbrun``                 executes notebooks, each in a fresh kernel with time limits
``grade``                 grades a folder of submitted notebooks (CSV and feedback per student)
``report``                benchmark results JSON and the README results table
========================  ===============================================================

It needs the ``dev`` extra (nbformat, nbclient, a Jupyter kernel): ``pip install -e ".[dev]"``,
which every ``make`` target does.  Students install only ``course_utils``, which never imports
this package, so nothing here may become a dependency of the notebooks themselves.
"""
