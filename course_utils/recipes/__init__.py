"""Recipes: what a notebook and its benchmark both run, written once.

A recipe strings models, data and the training loop together with a profile's settings (train the
detector, run the Table 4.1 grid, race SCAN against the query-agnostic model, fine-tune CLIP like
notebook 07, train ODITS).  Model files hold models; notebooks and ``benchmarks/`` call these.
"""
