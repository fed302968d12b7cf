"""One new patient: the input, the predictors in order (:func:`~oncofm.explain.pipeline.explain_patient`)
and the report folder. ``report/`` renders; the models' packages predict."""
