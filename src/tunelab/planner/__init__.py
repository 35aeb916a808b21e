"""The planner: memory and time of a run before it starts (``tunelab plan``).

``predict.py`` (``plan`` → a ``Plan``) puts the parts together: ``shape.py`` (the model's
dimensions, counted on the meta device), ``workload.py`` (the data's tokens and the run's
micro-batches, from ``data/``), ``memory.py`` (the peak-memory breakdown), ``speed.py``
(tokens/s and wall time), ``advice.py`` (what to change when it does not fit) and ``render.py``
(the tables ``tunelab plan`` prints). It sits above ``data/`` and ``model/`` and below
``train/``, whose calibration run it takes as a plain dict.
"""
