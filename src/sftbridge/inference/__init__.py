"""The one inference wrapper (``predictor``: a run directory in, answers out), adapter-vs-base evaluation
(``evaluate``) and folding the adapter into the base (``merge``)."""
